from fedcrm.data.loaders import load_mlc, load_telco
from fedcrm.data.partition import PartitionKind, partition_indices
from fedcrm.data.schema import MLC, TELCO


def test_real_telco_from_installed_package() -> None:
    frame = load_telco()
    assert frame.shape == (7043, len(TELCO.columns))
    assert int(frame["churn"].sum()) == 1869
    assert frame["total_charges"].isna().sum() == 11


def test_real_mlc_and_its_state_branches() -> None:
    frame = load_mlc()
    assert len(frame) == 5000
    assert int(frame["churn"].sum()) == 707
    parts = partition_indices(frame, kind=PartitionKind.NATURAL, column="state")
    assert len(parts) == 51
    assert min(len(p.indices) for p in parts) == 52
    assert max(len(p.indices) for p in parts) == 158
    sizes = {p.branch: len(p.indices) for p in partition_indices(frame, kind=PartitionKind.REGION)}
    assert sizes == {"midwest": 1158, "northeast": 903, "south": 1706, "west": 1233}
    assert set(MLC.columns) <= set(frame.columns)
