"""The scale-out commands' own parsing: ``--partitions`` lists."""

import click
import pytest

from indexer.cli import _partition_list


def test_partition_lists_take_single_partitions_and_ranges():
    assert _partition_list(None) is None
    assert _partition_list("0,2-5") == (0, 2, 3, 4, 5)
    assert _partition_list(" 3 , 1 ") == (1, 3)


@pytest.mark.parametrize("bad", ["", "a", "1-", "-1", "2,x"])
def test_bad_partition_lists_are_refused(bad):
    with pytest.raises(click.BadParameter):
        _partition_list(bad)
