"""RFC 9162 §2.1 Merkle tree: hashes against an independent reference, proofs, tampering."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.compliance import ProofError
from fedcrm.compliance.audit import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    merkle_tree_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# --- independent reference: the RFC 9162 §2.1 definitions, transcribed literally on lists ---


def ref_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def entries(n: int) -> list[bytes]:
    return [f"entry-{i}".encode() * (i % 3 + 1) for i in range(n)]


# Test vectors of the Certificate Transparency reference implementation (RFC 6962 / 9162 trees
# share the hashing): the eight leaves and the roots of their prefixes.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_domain_separated_hashes() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert (
        node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    )
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert merkle_tree_hash([]) == EMPTY_ROOT


@pytest.mark.parametrize("size", range(1, 9), ids=lambda n: f"size{n}")
def test_certificate_transparency_vectors(size: int) -> None:
    assert merkle_tree_hash(CT_LEAVES[:size]).hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 100])
def test_root_matches_reference(size: int) -> None:
    d = entries(size)
    tree = MerkleTree.from_entries(d)
    assert tree.root() == ref_mth(d)
    for m in range(size + 1):
        assert tree.root(m) == ref_mth(d[:m])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=12), min_size=1, max_size=70), st.data())
def test_proofs_match_reference_and_verify(d: list[bytes], data: st.DataObject) -> None:
    n = len(d)
    tree = MerkleTree.from_entries(d)
    m = data.draw(st.integers(0, n - 1), label="leaf")
    path = tree.inclusion_proof(m)
    assert path == ref_path(m, d)
    verify_inclusion(leaf_hash(d[m]), m, n, path, ref_mth(d))
    first = data.draw(st.integers(1, n), label="first")
    proof = tree.consistency_proof(first)
    expected = [] if first == n else ref_subproof(first, d, True)
    assert proof == expected
    verify_consistency(first, n, ref_mth(d[:first]), ref_mth(d), proof)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 80), st.data())
def test_tampered_inclusion_proofs_fail(n: int, data: st.DataObject) -> None:
    d = entries(n)
    tree = MerkleTree.from_entries(d)
    root = tree.root()
    m = data.draw(st.integers(0, n - 1))
    path = tree.inclusion_proof(m)
    leaf = leaf_hash(d[m])
    # A one-byte change of the leaf data.
    edited = bytearray(d[m] or b"\x00")
    edited[0] ^= 0x01
    with pytest.raises(ProofError):
        verify_inclusion(leaf_hash(bytes(edited)), m, n, path, root)
    # A flipped byte in a proof node.
    if path:
        i = data.draw(st.integers(0, len(path) - 1))
        node = bytearray(path[i])
        node[data.draw(st.integers(0, 31))] ^= 0x80
        bad = [*path[:i], bytes(node), *path[i + 1 :]]
        with pytest.raises(ProofError):
            verify_inclusion(leaf, m, n, bad, root)
        with pytest.raises(ProofError):
            verify_inclusion(leaf, m, n, path[:-1], root)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, m, n, [*path, root], root)
    # The wrong index or the wrong tree size.
    with pytest.raises(ProofError):
        verify_inclusion(leaf, (m + 1) % n, n, path, root)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, m, n, path, node_hash(root, root))
    with pytest.raises(ProofError):
        verify_inclusion(leaf, n, n, path, root)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 80), st.data())
def test_tampered_consistency_proofs_fail(n: int, data: st.DataObject) -> None:
    d = entries(n)
    tree = MerkleTree.from_entries(d)
    first = data.draw(st.integers(1, n - 1))
    proof = tree.consistency_proof(first)
    old_root, new_root = tree.root(first), tree.root()
    verify_consistency(first, n, old_root, new_root, proof)
    i = data.draw(st.integers(0, len(proof) - 1))
    node = bytearray(proof[i])
    node[0] ^= 0x01
    with pytest.raises(ProofError):
        verify_consistency(first, n, old_root, new_root, [*proof[:i], bytes(node), *proof[i + 1 :]])
    with pytest.raises(ProofError):
        verify_consistency(first, n, old_root, new_root, proof[:-1])
    with pytest.raises(ProofError):
        verify_consistency(first, n, old_root, new_root, [*proof, new_root])
    # An old entry altered, dropped, or two old entries swapped: the old root is not reproduced.
    j = data.draw(st.integers(0, first - 1))
    altered = [*d[:j], d[j] + b"!", *d[j + 1 :]]
    dropped = d[:j] + d[j + 1 :]
    swapped = list(d)
    k = (j + 1) % first if first > 1 else j
    swapped[j], swapped[k] = swapped[k], swapped[j]
    for history in (altered, dropped, swapped):
        if history[:first] == d[:first]:
            continue  # swapping a leaf with itself changes nothing
        rewritten = MerkleTree.from_entries(history)
        size = len(history)
        if size < first:
            continue
        with pytest.raises(ProofError):
            verify_consistency(
                first, size, old_root, rewritten.root(), rewritten.consistency_proof(first)
            )


def test_consistency_edge_cases() -> None:
    tree = MerkleTree.from_entries(entries(5))
    root = tree.root()
    verify_consistency(5, 5, root, root, [])
    verify_consistency(0, 5, EMPTY_ROOT, root, [])
    with pytest.raises(ProofError):
        verify_consistency(5, 5, root, tree.root(4), [])
    with pytest.raises(ProofError):
        verify_consistency(3, 5, tree.root(3), root, [])
    with pytest.raises(ProofError):
        verify_consistency(6, 5, root, root, [])
    with pytest.raises(ProofError):
        verify_consistency(3, 5, b"short", root, tree.consistency_proof(3))


def test_tree_rejects_bad_input() -> None:
    tree = MerkleTree.from_entries(entries(3))
    with pytest.raises(ValueError, match="32"):
        tree.append(b"x")
    with pytest.raises(ValueError):
        tree.root(4)
    with pytest.raises(ValueError):
        tree.inclusion_proof(3)
    with pytest.raises(ValueError):
        tree.consistency_proof(4)
