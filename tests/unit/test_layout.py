"""The rank layout of stages x replicas (the multi-process behaviour is in tests/dist)."""
import pytest

from localloss_pp.layout import Layout, layout_for


def test_rank_layout_keeps_each_replica_chain_on_consecutive_ranks():
    lay = layout_for(8, 2)
    assert (lay.num_stages, lay.num_replicas) == (4, 2)
    assert [(lay.stage_of(r), lay.replica_of(r)) for r in range(8)] == \
        [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]
    assert lay.stage_ranks(2) == [2, 6]
    assert all(lay.rank_of(lay.stage_of(r), lay.replica_of(r)) == r for r in range(8))


@pytest.mark.parametrize("per_node,crossings", [(8, 0), (4, 0), (2, 2), (1, 6)])
def test_node_crossings_follow_torchrun_numbering(per_node, crossings):
    lay = Layout(4, 2)
    nodes = [r // per_node for r in range(8)]  # torchrun numbers ranks node by node
    assert lay.cross_node_links(nodes) == crossings
    text = "\n".join(lay.describe(nodes, ["cuda:0"] * 8))
    assert "4 stage(s) x 2 replica(s) = 8 ranks" in text
    assert "replica 2: stage 1 (rank 4" in text
    if per_node < 8:
        assert f"{crossings} of 6 stage-to-stage links cross nodes" in text


def test_world_that_does_not_split_into_replicas_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 3"):
        layout_for(4, 3)
