from gemini_ckpt.recovery.plan import (
    FRESH_START,
    LOCAL_MEMORY,
    PERSISTENT_TIER,
    RestorePlan,
    peer_source,
    plan_restore,
    source_peer,
)


def test_newest_step_held_by_every_rank():
    plan = plan_restore(3, 4, {0: {0: [9, 10], 1: [10, 11]}, 1: {2: [9, 10], 3: [10, 11]}})
    assert plan.step == 10
    assert plan.sources == dict.fromkeys(range(4), LOCAL_MEMORY)
    assert plan.reason == (
        "step 10 is the newest step held in local memory by all 4 ranks; "
        "ranks [1, 3] also hold newer steps, discarded"
    )


def test_a_rank_one_step_behind_pulls_everyone_back():
    plan = plan_restore(1, 2, {0: {0: [4, 5]}, 1: {1: [3, 4]}})
    assert plan.step == 4


def test_fresh_start_when_nothing_is_held():
    plan = plan_restore(0, 2, {})
    assert plan.step is None
    assert plan.sources == {0: FRESH_START, 1: FRESH_START}
    assert "fresh start" in plan.reason


def test_no_common_step_is_explained():
    plan = plan_restore(2, 3, {0: {0: [5, 6], 1: [6]}, 1: {}})
    assert plan.step is None
    assert "no step is held by every rank" in plan.reason
    assert "ranks without a checkpoint: [2]" in plan.reason


def test_plan_roundtrip():
    plan = plan_restore(3, 2, {0: {0: [1], 1: [1]}})
    assert RestorePlan.from_dict(plan.to_dict()) == plan


def test_persistent_tier_fills_in_for_lost_memory():
    # machine 1 (ranks 2, 3) was replaced: its memory is empty; the disk has every 10th step
    inventories = {0: {0: [24, 25], 1: [24, 25]}, 1: {}}
    persistent = {0: [10, 20], 1: [10, 20], 2: [10, 20], 3: [10, 20]}
    plan = plan_restore(4, 4, inventories, persistent)
    assert plan.step == 20
    assert plan.sources == {
        0: PERSISTENT_TIER,
        1: PERSISTENT_TIER,
        2: PERSISTENT_TIER,
        3: PERSISTENT_TIER,
    }
    assert plan.reason.startswith("step 20 is the newest step every one of the 4 ranks can restore")
    assert "ranks [0, 1] also hold newer steps, discarded" in plan.reason


def test_memory_is_preferred_when_it_holds_the_step():
    inventories = {0: {0: [19, 20]}, 1: {1: []}}
    plan = plan_restore(2, 2, inventories, {0: [20], 1: [20]})
    assert plan.step == 20
    assert plan.sources == {0: LOCAL_MEMORY, 1: PERSISTENT_TIER}
    assert "rank 0 from local memory; rank 1 from persistent tier" in plan.reason


def test_a_step_missing_from_one_rank_on_disk_is_not_chosen():
    plan = plan_restore(1, 2, {0: {}, 1: {}}, {0: [10, 20], 1: [10]})
    assert plan.step == 10


def test_a_lost_machines_ranks_come_from_the_peers_holding_their_replicas():
    # 4 machines x 1 rank, groups {0, 1} and {2, 3}; machine 1 was replaced (empty memory)
    inventories = {0: {0: [6, 7]}, 1: {}, 2: {2: [6, 7]}, 3: {3: [6, 7]}}
    replicas = {0: {1: [6, 7]}, 1: {}, 2: {3: [6, 7]}, 3: {2: [6, 7]}}
    plan = plan_restore(2, 4, inventories, {r: [5] for r in range(4)}, replicas)
    assert plan.step == 7
    assert plan.sources == {
        0: LOCAL_MEMORY,
        1: peer_source(0),
        2: LOCAL_MEMORY,
        3: LOCAL_MEMORY,
    }
    assert "rank 1 from peer machine 0" in plan.reason
    assert source_peer(plan.sources[1]) == 0
    assert source_peer(LOCAL_MEMORY) is None


def test_a_lagging_replica_pulls_everyone_back_to_a_step_all_can_get():
    # machine 1 is lost; its rank's newest replica is step 6 while the others hold 7 and 8 in
    # memory: everyone resumes from 6, the survivors from their own replicas held by peers.
    inventories = {0: {0: [7, 8]}, 1: {}}
    replicas = {0: {1: [5, 6]}, 1: {}}
    plan = plan_restore(3, 2, inventories, None, {**replicas, 2: {0: [5, 6]}})
    assert plan.step == 6
    assert plan.sources == {0: peer_source(2), 1: peer_source(0)}


def test_peer_sources_are_spread_over_the_holders():
    replicas = {1: {0: [3], 2: [3]}, 2: {0: [3], 2: [3]}}
    plan = plan_restore(1, 3, {0: {1: [3]}}, None, replicas)
    assert plan.sources == {0: peer_source(1), 1: LOCAL_MEMORY, 2: peer_source(2)}


def test_the_persistent_tier_backs_a_whole_group_lost():
    # group {0, 1} lost together: nobody holds rank 0 or 1 in memory any more
    inventories = {0: {}, 1: {}, 2: {2: [8, 9]}, 3: {3: [8, 9]}}
    replicas = {2: {3: [8, 9]}, 3: {2: [8, 9]}}
    plan = plan_restore(5, 4, inventories, {r: [5] for r in range(4)}, replicas)
    assert plan.step == 5
    assert set(plan.sources.values()) == {PERSISTENT_TIER}
