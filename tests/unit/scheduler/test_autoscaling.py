"""Min/max deployments follow demand: up under sustained pressure, down when idle, to zero and back."""

from __future__ import annotations

from collections.abc import Sequence

from balancer.scheduler import Autoscaler, Copy, CopyState, Demand, Deployment, Plan, Reconciler, Scale
from tests.unit.scheduler.hardware import Clock, cuda_node, gguf, gpu

MODEL = gguf("org/m-gguf", 4, required_gb=6)
NODES = [cuda_node(f"n{i}", gpu(0, 24)) for i in range(4)]


def scaled(low: int, high: int) -> Deployment:
    return Deployment(MODEL.model_id, copies=None, min_copies=low, max_copies=high)


def ready_on(*node_ids: str) -> list[Copy]:
    return [Copy(MODEL.model_id, n, 0, CopyState.READY) for n in node_ids]


def step(reconciler: Reconciler, deployment: Deployment, copies: Sequence[Copy], demand: Demand) -> Plan:
    return reconciler.plan([deployment], NODES, copies, {MODEL.model_id: MODEL}, {MODEL.model_id: demand})


def test_waiting_requests_add_a_copy_only_once_the_pressure_lasted_the_window() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(queue_wait_s=2.0, up_window_s=10.0))
    busy = Demand(MODEL.model_id, queue_wait_s=3.5, in_flight=4, last_request_at=clock.now)

    assert step(reconciler, scaled(1, 3), ready_on("n0"), busy) == Plan()  # the window starts
    clock.advance(9)
    assert step(reconciler, scaled(1, 3), ready_on("n0"), busy) == Plan()
    clock.advance(1)
    plan = step(reconciler, scaled(1, 3), ready_on("n0"), busy)

    assert plan.scaling == (
        Scale(
            MODEL.model_id, 1, 2, "requests waited 3.5 s on average, 4.0 in flight per ready copy, for 10 s"
        ),
    )
    assert [p.node_id for p in plan.places] == ["n1"]


def test_in_flight_above_the_slots_scales_up_but_never_past_max_nor_before_the_new_copy_is_ready() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(slots_per_copy=4, up_window_s=10.0))
    crowded = Demand(MODEL.model_id, in_flight=9, last_request_at=clock.now)
    step(reconciler, scaled(1, 2), ready_on("n0"), crowded)
    clock.advance(10)
    assert [s.after for s in step(reconciler, scaled(1, 2), ready_on("n0"), crowded).scaling] == [2]

    pending = [*ready_on("n0"), Copy(MODEL.model_id, "n1", 0, CopyState.LOADING)]
    clock.advance(20)
    assert step(reconciler, scaled(1, 2), pending, crowded) == Plan()  # at max, and one still loading
    clock.advance(20)
    assert step(reconciler, scaled(1, 2), ready_on("n0", "n1"), crowded) == Plan()


def test_an_idle_model_loses_a_copy_per_idle_window_down_to_min() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(idle_s=300.0))
    quiet = Demand(MODEL.model_id, last_request_at=clock.now)
    assert step(reconciler, scaled(1, 3), ready_on("n0", "n1", "n2"), quiet) == Plan()  # a restart keeps 3

    clock.advance(299)
    assert step(reconciler, scaled(1, 3), ready_on("n0", "n1", "n2"), quiet) == Plan()
    clock.advance(1)
    plan = step(reconciler, scaled(1, 3), ready_on("n0", "n1", "n2"), quiet)
    assert plan.scaling == (Scale(MODEL.model_id, 3, 2, "no request for 300 s"),)
    assert len(plan.removals) == 1 and plan.removals[0].reason == "3 copies where 2 are wanted"

    clock.advance(60)  # the next step waits a whole idle window more
    assert step(reconciler, scaled(1, 3), ready_on("n0", "n1"), quiet) == Plan()
    clock.advance(240)
    assert [s.after for s in step(reconciler, scaled(1, 3), ready_on("n0", "n1"), quiet).scaling] == [1]
    clock.advance(600)
    assert step(reconciler, scaled(1, 3), ready_on("n0"), quiet) == Plan()  # min reached


def test_min_zero_lets_the_last_copy_go_when_idle_and_a_waiting_request_brings_one_back_at_once() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(idle_s=300.0))
    quiet = Demand(MODEL.model_id, last_request_at=clock.now)
    step(reconciler, scaled(0, 2), ready_on("n0"), quiet)
    clock.advance(300)
    plan = step(reconciler, scaled(0, 2), ready_on("n0"), quiet)
    assert [s.after for s in plan.scaling] == [0] and [r.node_id for r in plan.removals] == ["n0"]

    clock.advance(5)
    assert step(reconciler, scaled(0, 2), [], quiet) == Plan()  # stays at zero while nobody asks
    plan = step(reconciler, scaled(0, 2), [], Demand(MODEL.model_id, waiting=1, last_request_at=clock.now))
    assert plan.scaling == (Scale(MODEL.model_id, 0, 1, "requests waiting with no copy"),)
    assert len(plan.places) == 1


def test_far_below_capacity_for_the_window_sheds_a_copy_though_requests_still_come() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(low_fraction=0.25, down_window_s=300.0))
    trickle = Demand(MODEL.model_id, in_flight=1, last_request_at=clock.now)
    step(reconciler, scaled(1, 4), ready_on("n0", "n1", "n2"), trickle)
    clock.advance(299)
    assert (
        step(
            reconciler,
            scaled(1, 4),
            ready_on("n0", "n1", "n2"),
            Demand(MODEL.model_id, in_flight=1, last_request_at=clock.now),
        )
        == Plan()
    )
    clock.advance(1)
    plan = step(
        reconciler,
        scaled(1, 4),
        ready_on("n0", "n1", "n2"),
        Demand(MODEL.model_id, in_flight=1, last_request_at=clock.now),
    )
    assert [(s.before, s.after) for s in plan.scaling] == [(3, 2)]
    assert plan.scaling[0].reason == "1 in flight would keep 2 copies under 25% of their slots for 300 s"


def test_a_fixed_deployment_ignores_demand() -> None:
    clock = Clock()
    reconciler = Reconciler(clock)
    fixed = Deployment(MODEL.model_id, copies=2)
    for _ in range(3):
        plan = step(
            reconciler, fixed, ready_on("n0", "n1"), Demand(MODEL.model_id, queue_wait_s=30, in_flight=50)
        )
        assert plan == Plan()
        clock.advance(400)


def slotted(slots: int, *node_ids: str) -> list[Copy]:
    """Ready copies on nodes that report ``slots`` for the model."""
    return [Copy(MODEL.model_id, n, 0, CopyState.READY, slots=slots) for n in node_ids]


def test_in_flight_scales_up_past_the_slots_the_copies_nodes_report_not_the_setting() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(slots_per_copy=4, up_window_s=10.0))
    six = Demand(MODEL.model_id, in_flight=6, last_request_at=clock.now)

    step(reconciler, scaled(1, 3), slotted(8, "n0"), six)
    clock.advance(10)
    assert step(reconciler, scaled(1, 3), slotted(8, "n0"), six) == Plan()  # 6 in flight fit its 8 slots

    step(reconciler, scaled(1, 3), slotted(2, "n0"), six)
    clock.advance(10)
    plan = step(reconciler, scaled(1, 3), slotted(2, "n0"), six)  # 6 in flight, 2 slots: one more copy
    assert [s.after for s in plan.scaling] == [2]


def test_copies_whose_nodes_report_no_slots_count_the_setting() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(slots_per_copy=4, up_window_s=10.0))
    five = Demand(MODEL.model_id, in_flight=5, last_request_at=clock.now)

    step(reconciler, scaled(1, 3), slotted(0, "n0"), five)
    clock.advance(10)
    assert [s.after for s in step(reconciler, scaled(1, 3), slotted(0, "n0"), five).scaling] == [2]


def test_a_copy_with_many_slots_is_shed_only_under_a_quarter_of_them() -> None:
    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(low_fraction=0.25, down_window_s=300.0))
    three = Demand(MODEL.model_id, in_flight=3, last_request_at=clock.now)
    step(reconciler, scaled(1, 4), slotted(16, "n0", "n1"), three)  # 3 of one copy's 16: under 25 %
    clock.advance(300)
    plan = step(reconciler, scaled(1, 4), slotted(16, "n0", "n1"), three)
    assert [(s.before, s.after) for s in plan.scaling] == [(2, 1)]

    clock = Clock()
    reconciler = Reconciler(clock, autoscaler=Autoscaler(low_fraction=0.25, down_window_s=300.0))
    step(reconciler, scaled(1, 4), slotted(4, "n0", "n1"), three)  # 3 of one copy's 4: kept
    clock.advance(300)
    assert step(reconciler, scaled(1, 4), slotted(4, "n0", "n1"), three) == Plan()
