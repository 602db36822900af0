"""Schedules against values worked out by hand from the reference formula (prune-ofa.md)."""
import pytest

from pipelines.sparsity.config import PruningConfig, ScheduleConfig
from pipelines.sparsity.lr_rewind import make_lr_lambda, rewinding_lr_multiplier
from pipelines.sparsity.schedules import is_mask_update_step, last_mask_update_step, target_sparsity

CUBIC = ScheduleConfig(kind="cubic", policy_begin_step=100, policy_end_step=200, begin_pruning_step=100,
                       end_pruning_step=300, pruning_frequency=50, initial_sparsity=0.1, final_sparsity=0.9)


# s(t) = 0.1 + 0.8 * (1 - clip((1 - (t - 100) / 100) ** 3, 0, 1))
@pytest.mark.parametrize("step, expected", [
    (0, 0.1),          # before the policy: base clipped to 1
    (99, 0.1),
    (100, 0.1),        # policy start
    (110, 0.1 + 0.8 * (1 - 0.9**3)),   # 0.3168
    (150, 0.8),        # 0.1 + 0.8 * (1 - 0.125)
    (175, 0.8875),     # 0.1 + 0.8 * (1 - 0.015625)
    (199, 0.1 + 0.8 * (1 - 0.01**3)),
    (200, 0.9),        # policy end
    (201, 0.9),        # base clipped to 0
    (10_000, 0.9),
])
def test_cubic_values(step, expected):
    assert target_sparsity(CUBIC, step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step, expected", [
    (0, False), (99, False), (100, True), (101, False), (125, False), (150, True), (250, True),
    (300, True),   # end_pruning_step is inclusive
    (301, False), (350, False),
])
def test_cubic_update_steps(step, expected):
    assert is_mask_update_step(CUBIC, step) is expected


def test_end_minus_one_never_stops_and_last_update_step():
    forever = CUBIC.model_copy(update={"end_pruning_step": -1})
    assert is_mask_update_step(forever, 100 + 50 * 1000)
    assert last_mask_update_step(forever) is None
    assert last_mask_update_step(CUBIC) == 300
    assert last_mask_update_step(CUBIC.model_copy(update={"end_pruning_step": 320})) == 300


def test_reference_bert_base_schedule():
    ref = ScheduleConfig(policy_begin_step=0, policy_end_step=50_000, begin_pruning_step=0,
                         end_pruning_step=80_000, pruning_frequency=1_000, final_sparsity=0.9)
    assert target_sparsity(ref, 0) == 0.0
    assert target_sparsity(ref, 25_000) == pytest.approx(0.9 * (1 - 0.5**3))
    assert target_sparsity(ref, 60_000) == pytest.approx(0.9)
    updates = [t for t in range(0, 100_001, 500) if is_mask_update_step(ref, t)]
    assert updates[0] == 0 and updates[-1] == 80_000 and len(updates) == 81


def test_one_shot_and_constant():
    one = ScheduleConfig(kind="one_shot", begin_pruning_step=7, final_sparsity=0.8)
    assert [is_mask_update_step(one, t) for t in (6, 7, 8)] == [False, True, False]
    assert [target_sparsity(one, t) for t in (6, 7, 8)] == [0.0, 0.8, 0.8]
    const = ScheduleConfig(kind="constant", final_sparsity=0.9)
    assert not any(is_mask_update_step(const, t) for t in range(0, 3000, 7))
    assert last_mask_update_step(const) is None


def test_lr_rewind_multiplier_table():
    # total 100, warmup 10, window [20, 60) rewound every 10 steps (api_utils.py's formula):
    # outside = 100 - 40 = 60 steps advance the decay; span = 60 - 10 = 50.
    f = lambda t, clamp=False: rewinding_lr_multiplier(t, 10, 100, 20, 60, 10, clamp)  # noqa: E731
    assert f(0) == 0.0 and f(5) == 0.5                     # warm-up
    assert f(10) == pytest.approx(1.0)                     # (100 - 40 - 10) / 50
    assert f(15) == pytest.approx(45 / 50)                 # (100 - 40 - 15) / 50
    assert f(20) == pytest.approx(40 / 50)                 # the window starts
    assert f(25) == pytest.approx(35 / 50)                 # decays inside an interval...
    assert f(30) == pytest.approx(40 / 50)                 # ...rewound at the next mask update
    assert f(59) == pytest.approx(31 / 50)
    assert f(60) == pytest.approx(40 / 50)                 # the window ended: decay restarts from there
    assert f(80) == pytest.approx(20 / 50)
    assert f(100) == 0.0
    # a window that starts at 0 rewinds above the peak (the reference does not clamp)
    g = lambda t, clamp=False: rewinding_lr_multiplier(t, 10, 100, 0, 40, 10, clamp)  # noqa: E731
    assert g(10) == pytest.approx(60 / 50) and g(10, clamp=True) == 1.0


def test_lr_lambda_follows_the_recipe_options():
    sched = ScheduleConfig(begin_pruning_step=20, end_pruning_step=60, pruning_frequency=10,
                           policy_begin_step=20, policy_end_step=50)
    plain = make_lr_lambda(PruningConfig(schedule=sched, lr_rewind=False), 10, 100)
    policy = make_lr_lambda(PruningConfig(schedule=sched, lr_rewind=True), 10, 100)
    window = make_lr_lambda(PruningConfig(schedule=sched, lr_rewind=True, lr_rewind_window="pruning"), 10, 100)
    assert plain(55) == pytest.approx(45 / 90)
    assert policy(55) == pytest.approx((100 - 55) / (70 - 10))  # after the policy window [20, 50)
    assert window(55) == pytest.approx((60 - 25) / 50)


def test_rewind_options_without_rewinding_are_refused():
    with pytest.raises(ValueError, match="pruning.lr_rewind is false"):
        PruningConfig(lr_rewind=False, lr_rewind_clamp=True)
