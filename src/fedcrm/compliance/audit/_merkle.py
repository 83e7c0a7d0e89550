"""Merkle Tree Hash, inclusion and consistency proofs exactly as RFC 9162 §2.1.

Implementation based on RFC 9162 (Certificate Transparency Version 2.0), §2.1.1 (definition of
the Merkle Tree Hash), §2.1.3 (inclusion proofs: generation §2.1.3.1, verification §2.1.3.2) and
§2.1.4 (consistency proofs: generation §2.1.4.1, verification §2.1.4.2). The hash algorithm is
SHA-256 and leaf and interior nodes are domain-separated with the prefixes ``0x00`` and ``0x01``
(RFC 9162 §2.1.1), so a leaf can never be passed off as an interior node.

The generation functions take the *leaf hashes* of the log, ``leaf_hash(d(i))``; the verifiers
take only hashes, sizes and proofs, so a third party can check them without the data.

Notes:
    The verification algorithms are transcribed step by step from RFC 9162 §2.1.3.2 and
    §2.1.4.2 (the step numbers are in the comments). RFC 9162 defines consistency proofs only for
    ``0 < first < second``; like the reference Go implementation (transparency-dev/merkle) this
    module also accepts ``first == second`` (empty proof, equal roots) and ``first == 0`` (empty
    proof: every tree extends the empty tree).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from fedcrm.compliance.errors import ProofError

HASH_SIZE = 32
"""Bytes in a SHA-256 node hash."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""``MTH({}) = SHA-256()``, the hash of the empty tree (RFC 9162 §2.1.1)."""


def leaf_hash(data: bytes) -> bytes:
    """Hash one log entry: ``SHA-256(0x00 || d(i))`` (RFC 9162 §2.1.1)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash an interior node: ``SHA-256(0x01 || left || right)`` (RFC 9162 §2.1.1)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """Return the largest power of two ``k`` with ``k < n`` (``n > 1``), as in RFC 9162 §2.1.1."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only Merkle tree over leaf hashes, with cached complete subtrees.

    The hash of every complete (power-of-two sized, aligned) subtree is stored once, when its
    last leaf arrives; since the log is append-only those hashes never change. Roots and proofs
    for any earlier size are then computed in ``O(log n)`` hashes, following the recursive
    definitions of RFC 9162 §2.1.1, §2.1.3.1 and §2.1.4.1.

    Args:
        leaf_hashes: Leaf hashes ``leaf_hash(d(i))`` to start from, in log order.
    """

    def __init__(self, leaf_hashes: Sequence[bytes] = ()) -> None:
        # _levels[h][i] is the hash of the complete subtree over leaves [i*2^h, (i+1)*2^h).
        self._levels: list[list[bytes]] = [[]]
        for value in leaf_hashes:
            self.append(value)

    @classmethod
    def from_entries(cls, entries: Sequence[bytes]) -> MerkleTree:
        """Build the tree of raw entries ``d(0) .. d(n-1)`` (each hashed with :func:`leaf_hash`)."""
        return cls([leaf_hash(entry) for entry in entries])

    def __len__(self) -> int:
        return len(self._levels[0])

    @property
    def size(self) -> int:
        """Number of leaves in the tree."""
        return len(self._levels[0])

    def leaf(self, index: int) -> bytes:
        """Return the leaf hash at ``index``."""
        return self._levels[0][index]

    def append(self, value: bytes) -> int:
        """Append a leaf hash and return its index.

        Raises:
            ValueError: ``value`` is not a 32-byte hash.
        """
        if len(value) != HASH_SIZE:
            raise ValueError(f"a leaf hash has {HASH_SIZE} bytes, got {len(value)}")
        self._levels[0].append(value)
        index = len(self._levels[0]) - 1
        level = 0
        # Every time the index ends in a 1 bit at this level, a complete subtree just closed.
        while len(self._levels[level]) % 2 == 0:
            nodes = self._levels[level]
            parent = node_hash(nodes[-2], nodes[-1])
            if level + 1 == len(self._levels):
                self._levels.append([])
            self._levels[level + 1].append(parent)
            level += 1
        return index

    def _subtree(self, start: int, end: int) -> bytes:
        """Return ``MTH(D[start:end])`` (RFC 9162 §2.1.1), ``0 <= start < end <= size``."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            level = n.bit_length() - 1
            return self._levels[level][start >> level]
        k = _largest_power_of_two_below(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def _check_size(self, tree_size: int | None) -> int:
        size = self.size if tree_size is None else tree_size
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size must be in [0, {self.size}], got {size}")
        return size

    def root(self, tree_size: int | None = None) -> bytes:
        """Return the Merkle Tree Hash of the first ``tree_size`` leaves (default: all).

        Implements ``MTH(D[n])`` of RFC 9162 §2.1.1, including ``MTH({}) = SHA-256()``.

        Raises:
            ValueError: ``tree_size`` is negative or larger than the tree.
        """
        size = self._check_size(tree_size)
        if size == 0:
            return EMPTY_ROOT
        return self._subtree(0, size)

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> list[bytes]:
        """Return the audit path ``PATH(m, D[n])`` of leaf ``index`` (RFC 9162 §2.1.3.1).

        Args:
            index: Leaf index ``m``, ``0 <= m < n``.
            tree_size: Tree size ``n`` the proof is relative to (default: the whole tree).

        Returns:
            The sibling hashes from the leaf up to the root.

        Raises:
            ValueError: ``index`` is not a leaf of the tree of size ``tree_size``.
        """
        size = self._check_size(tree_size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index must be in [0, {size}), got {index}")
        return self._path(index, 0, size)

    def _path(self, m: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = _largest_power_of_two_below(n)
        if m < k:
            return [*self._path(m, start, start + k), self._subtree(start + k, end)]
        return [*self._path(m - k, start + k, end), self._subtree(start, start + k)]

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """Return the consistency proof ``PROOF(m, D[n])`` (RFC 9162 §2.1.4.1).

        Args:
            first: Size ``m`` of the earlier tree, ``0 <= m <= n``.
            second: Size ``n`` of the later tree (default: the whole tree).

        Returns:
            The proof nodes; empty when ``first`` is 0 or equals ``second``.

        Raises:
            ValueError: The sizes are out of range or ``first > second``.
        """
        size = self._check_size(second)
        if not 0 <= first <= size:
            raise ValueError(f"first tree size must be in [0, {size}], got {first}")
        if first in (0, size):
            return []
        return self._subproof(first, 0, size, True)

    def _subproof(self, m: int, start: int, end: int, complete: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if complete else [self._subtree(start, end)]
        k = _largest_power_of_two_below(n)
        if m <= k:
            return [*self._subproof(m, start, start + k, complete), self._subtree(start + k, end)]
        return [*self._subproof(m - k, start + k, end, False), self._subtree(start, start + k)]


def merkle_tree_hash(entries: Sequence[bytes]) -> bytes:
    """Return ``MTH(D[n])`` of raw entries ``d(0) .. d(n-1)`` (RFC 9162 §2.1.1)."""
    return MerkleTree.from_entries(entries).root()


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} must be a {HASH_SIZE}-byte SHA-256 hash, got {len(value)} bytes")


def root_from_inclusion_proof(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes:
    """Recompute the root implied by an inclusion proof (RFC 9162 §2.1.3.2, steps 1-4).

    Args:
        leaf: The leaf hash ``hash`` whose inclusion is claimed.
        index: Its index ``leaf_index``.
        tree_size: The size of the tree the proof is relative to.
        proof: The ``inclusion_path``.

    Returns:
        The root hash the proof leads to.

    Raises:
        ProofError: The proof is malformed for this index and size.
    """
    _check_hash("leaf hash", leaf)
    for node in proof:
        _check_hash("proof node", node)
    # Step 1: leaf_index must be inside the tree.
    if not 0 <= index < tree_size:
        raise ProofError(f"leaf index {index} is outside a tree of size {tree_size}")
    # Step 2.
    fn, sn = index, tree_size - 1
    # Step 3.
    r = leaf
    # Step 4.
    for p in proof:
        # 4a.
        if sn == 0:
            raise ProofError(f"inclusion proof for leaf {index} of {tree_size} is too long")
        # 4b.
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        # 4c.
        fn >>= 1
        sn >>= 1
    # Step 5 (first half): sn must have reached 0.
    if sn != 0:
        raise ProofError(f"inclusion proof for leaf {index} of {tree_size} is too short")
    return r


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Verify an inclusion proof against a root hash (RFC 9162 §2.1.3.2).

    Args:
        leaf: The leaf hash ``hash`` whose inclusion is claimed.
        index: Its index ``leaf_index``.
        tree_size: The size of the tree that has root ``root``.
        proof: The ``inclusion_path``.
        root: The trusted ``root_hash`` (for example from a signed checkpoint).

    Raises:
        ProofError: The proof is malformed, or does not lead to ``root``.
    """
    _check_hash("root hash", root)
    computed = root_from_inclusion_proof(leaf, index, tree_size, proof)
    # Step 5 (second half).
    if not hmac.compare_digest(computed, root):
        raise ProofError(
            f"inclusion proof for leaf {index} does not lead to the root of the tree of size "
            f"{tree_size}: the leaf or the proof was altered"
        )


def verify_consistency(
    first: int,
    second: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Verify that the tree of size ``second`` extends the tree of size ``first``.

    Implements RFC 9162 §2.1.4.2; see the module notes for the ``first == 0`` and
    ``first == second`` cases.

    Args:
        first: Size of the earlier tree.
        second: Size of the later tree.
        first_root: Root hash ``first_hash`` of the earlier tree.
        second_root: Root hash ``second_hash`` of the later tree.
        proof: The ``consistency_path``.

    Raises:
        ProofError: The later tree does not extend the earlier one, or the proof is malformed.
    """
    _check_hash("first root hash", first_root)
    _check_hash("second root hash", second_root)
    for node in proof:
        _check_hash("proof node", node)
    if not 0 <= first <= second:
        raise ProofError(f"tree sizes must satisfy 0 <= first <= second, got {first}, {second}")
    if first == second:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if not hmac.compare_digest(first_root, second_root):
            raise ProofError(f"two different roots for the same tree size {first}")
        return
    if first == 0:
        if proof:
            raise ProofError("a consistency proof from the empty tree must be empty")
        return
    # Step 1.
    if not proof:
        raise ProofError(f"empty consistency proof from size {first} to {second}")
    path = list(proof)
    # Step 2.
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    # Step 3.
    fn, sn = first - 1, second - 1
    # Step 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = path[0]
    # Step 6.
    for c in path[1:]:
        # 6a.
        if sn == 0:
            raise ProofError(f"consistency proof from size {first} to {second} is too long")
        # 6b.
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        # 6c.
        fn >>= 1
        sn >>= 1
    # Step 7.
    if sn != 0:
        raise ProofError(f"consistency proof from size {first} to {second} is too short")
    if not hmac.compare_digest(fr, first_root):
        raise ProofError(
            f"the tree of size {second} does not extend the tree of size {first}: the earlier "
            "root is not reproduced (an old entry was altered, dropped or reordered)"
        )
    if not hmac.compare_digest(sr, second_root):
        raise ProofError(
            f"consistency proof from size {first} does not lead to the root of the tree of "
            f"size {second}"
        )
