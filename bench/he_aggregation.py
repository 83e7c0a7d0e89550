"""Benchmark: CKKS-encrypted FedAvg aggregation with fedcrm's summation-only parameters.

Run: ``.venv/bin/python bench/he_aggregation.py`` (about 1 minute on the 2-core VM).

For a churn-model-sized vector (3,000 parameters) and a 100,000-parameter vector it prints:
ciphertext bytes per float32 parameter (beside TenSEAL's usual parameters with fedcrm's packing,
measured in the same run, and the anchors: TenSEAL's usual parameters with TenSEAL's packing,
20.7x, and NVIDIA Clara, 14.9x), encryption time per branch, server-side summation throughput for
10 and 100 branches (deserialise + add + serialise, GB/s of ciphertext summed), decryption time
of the aggregate, and the relative error of a 1,000-branch sum.

Branch updates are pre-weighted as in the HE strategy: ``n_k * u_k`` with example counts
``n_k`` drawn from 1..10,000 and update entries ``u_k ~ N(0, 0.03)`` clipped to +-0.1, so
``|n_k * u_k| <= 1e3`` (the declared range). The error rows also show the range edge: every value
uniform in +-1e3. Timings are medians of ``--repeats`` runs, single-threaded.
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from fedcrm.privacy import he

# Anchors (ANCHORS.md section 5): bytes of ciphertext per float32 parameter.
ANCHOR_TENSEAL_USUAL = 20.7  # TenSEAL N=8192 [60,40,40,60], measured on this VM (STACK.md)
ANCHOR_CLARA = 14.9  # NVIDIA Clara Train 4.0, 19 MB -> 283 MB (H. Roth, NVIDIA blog, 2021)
USUAL_PARAMS = he.CKKSParameters(
    poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40
)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def branch_updates(rng: np.random.Generator, branches: int, size: int) -> np.ndarray:
    counts = rng.integers(1, 10_001, size=(branches, 1))
    deltas = np.clip(rng.normal(0.0, 0.03, size=(branches, size)), -0.1, 0.1)
    return counts * deltas


def expansion(pair: he.ContextPair, x: np.ndarray) -> float:
    wire = he.encrypt_update(pair.secret, x, key_id=pair.key_id).to_bytes()
    return len(wire) / (x.size * 4)


def relative_error(pair: he.ContextPair, x: np.ndarray) -> tuple[float, float]:
    """Encrypt each row, sum on the public context, decrypt; (max rel. error, max abs error)."""
    updates = [he.encrypt_update(pair.secret, row, key_id=pair.key_id) for row in x]
    total = he.decrypt(pair.secret, he.sum_encrypted(pair.public, updates))
    exact = x.sum(axis=0)
    abs_err = float(np.abs(total - exact).max())
    return abs_err / float(np.abs(exact).max()), abs_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    parser.add_argument(
        "--error-branches", type=int, default=1000, help="branches for the error row"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    pair = he.create_contexts()
    usual = he.create_contexts(params=USUAL_PARAMS)
    p = pair.secret.params
    print(
        f"fedcrm CKKS aggregation benchmark - {platform.processor() or platform.machine()}, "
        f"seed {args.seed}, median of {args.repeats}"
    )
    print(
        f"parameters: N={p.poly_modulus_degree}, primes={list(p.coeff_mod_bit_sizes)} "
        f"(log Q={sum(p.coeff_mod_bit_sizes)} <= {he.MAX_LOG_Q_128[p.poly_modulus_degree]} for "
        f"128-bit), scale=2^{p.scale_bits}, {p.slot_count} slots/ciphertext, public-key encryption"
    )
    print()
    header = f"{'metric':<58}{'3,000 params':>16}{'100,000 params':>16}"
    print(header)
    print("-" * len(header))

    rows: dict[str, list[str]] = {}

    def row(name: str, value: str) -> None:
        rows.setdefault(name, []).append(value)

    for size in (3_000, 100_000):
        x = branch_updates(rng, 100, size)
        row("ciphertext bytes / float32 param, fedcrm (x)", f"{expansion(pair, x[0]):.2f}")
        full = (size // p.values_per_ciphertext) * p.values_per_ciphertext
        row(
            "  same, whole ciphertexts only (no padding) (x)",
            f"{expansion(pair, x[0, :full]):.2f}" if full else "n/a",
        )
        row(
            "  TenSEAL's usual N=8192 [60,40,40,60], fedcrm packing (x)",
            f"{expansion(usual, x[0]):.2f}",
        )
        row("  anchor: TenSEAL usual, measured here (x)", f"{ANCHOR_TENSEAL_USUAL:.1f}")
        row("  anchor: NVIDIA Clara Train 4.0 (x)", f"{ANCHOR_CLARA:.1f}")
        row(
            "bytes on the wire per branch (kB)",
            f"{len(he.encrypt_update(pair.secret, x[0], key_id=pair.key_id).to_bytes()) / 1e3:.1f}",
        )

        enc_time = median_time(
            partial(he.encrypt_update, pair.secret, x[0], key_id=pair.key_id), args.repeats
        )
        row("encryption per branch (ms)", f"{enc_time * 1e3:.1f}")

        wire = [he.encrypt_update(pair.secret, v, key_id=pair.key_id).to_bytes() for v in x[:10]]
        for branches in (10, 100):
            batch = [wire[i % len(wire)] for i in range(branches)]  # reuse: same cost per add
            nbytes = sum(len(b) for b in batch)

            def server_sum(batch: list[bytes] = batch) -> bytes:
                updates = [he.EncryptedUpdate.from_bytes(b) for b in batch]
                return he.sum_encrypted(pair.public, updates).to_bytes()

            t = median_time(server_sum, max(1, args.repeats // (2 if branches == 100 else 1)))
            row(f"server sum, {branches} branches (ms)", f"{t * 1e3:.1f}")
            row(f"server sum throughput, {branches} branches (GB/s)", f"{nbytes / t / 1e9:.3f}")
            plain = x[: min(branches, len(x))].astype(np.float32)
            tp = median_time(partial(np.sum, plain, axis=0), args.repeats)
            row(
                f"  plaintext float32 sum, {min(branches, len(x))} branches (GB/s)",
                f"{plain.nbytes / tp / 1e9:.2f}",
            )

        aggregate = he.sum_encrypted(pair.public, [he.EncryptedUpdate.from_bytes(b) for b in wire])
        dec_time = median_time(partial(he.decrypt, pair.secret, aggregate), args.repeats)
        row("decryption of the aggregate (ms)", f"{dec_time * 1e3:.1f}")

    for name, values in rows.items():
        print(f"{name:<58}{values[0]:>16}{values[1]:>16}")

    k = args.error_branches
    print()
    print(f"error of a {k}-branch sum (3,000 params; max abs error / max |aggregate|):")
    realistic = branch_updates(rng, k, 3_000)
    edge = rng.uniform(-1e3, 1e3, size=(k, 3_000))
    for label, x in (
        ("pre-weighted deltas, |n u| <= 1e3", realistic),
        ("uniform +-1e3 (range edge)", edge),
    ):
        t = time.perf_counter()
        rel, abs_err = relative_error(pair, x)
        print(
            f"  {label:<36} max relative error {rel:.2e}  max abs error {abs_err:.2e} "
            f"(bound {p.error_bound(k):.1e}; {time.perf_counter() - t:.1f} s)"
        )
    print(
        f"  capacity: |sum| < {p.capacity:.3g} = 2^{p.data_bits - 1 - p.scale_bits}; "
        f"declared {p.max_summands} x {p.max_abs_value:g} = {p.max_summands * p.max_abs_value:.3g}"
    )


if __name__ == "__main__":
    main()
