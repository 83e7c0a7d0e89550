"""Independent random streams per purpose and branch (`fedcrm.seeds`)."""

import numpy as np

from fedcrm.seeds import Stream, generator, integer, sequence


def test_streams_differ_from_the_root_and_from_each_other() -> None:
    root = np.random.default_rng(7).permutation(50)
    draws = {
        (stream, key): tuple(generator(7, stream, key).permutation(50))
        for stream in Stream
        for key in (0, 1)
    }
    assert len(set(draws.values())) == len(draws)
    assert tuple(root) not in draws.values()
    # The pitfall the streams avoid: a trailing zero word does not change NumPy's seed.
    assert (np.random.default_rng([7, 0]).permutation(50) == root).all()


def test_streams_are_reproducible_and_spawn_children() -> None:
    assert integer(7, Stream.PARTITION) == integer(7, Stream.PARTITION)
    child = np.random.SeedSequence(7).spawn(3)[2]
    assert sequence(7, Stream.SYNTHETIC, 4).spawn_key == (3, 4)
    assert child.spawn_key == (2,) == sequence(7, Stream.CONSENT).spawn_key
    assert (
        generator(7, Stream.CONSENT).permutation(10)
        == np.random.default_rng(np.random.SeedSequence(7).spawn(3)[2]).permutation(10)
    ).all()
