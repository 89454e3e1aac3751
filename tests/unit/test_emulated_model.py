"""The emulated workload's arithmetic: Table 2 shapes, scaling, partitions, buckets, durations."""

import math

import pytest

from gemini_ckpt.demo import emulated_model as em
from gemini_ckpt.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "billions"),
    [("gpt2-10b", 3.75), ("gpt2-20b", 20.4), ("gpt2-40b", 40.5), ("gpt2-100b", 100.3)],
)
def test_table_2_shapes_have_the_standard_gpt2_parameter_count(name, billions):
    shape = em.MODELS[name]
    h, f, n = shape.hidden, shape.ffn, shape.layers
    # 4h^2 + 2hf weights, 3h + h + f + h biases, two layer norms; embeddings and a final norm.
    expected = n * (4 * h * h + 2 * h * f + 9 * h + f) + (em.VOCAB + em.SEQ_LEN + 2) * h
    assert em.parameter_count(shape) == expected
    assert expected / 1e9 == pytest.approx(billions, abs=0.05)


def test_scaling_keeps_every_layer_and_tensor_and_rounds_counts_up():
    plan = em.plan_for("gpt2-20b", "zero3", 4)
    assert plan.scale == 1024
    layers = plan.layers()
    assert len(layers) == 1 + 64  # embedding "layer" first
    assert [len(layer) for layer in layers] == [3] + [10] * 64
    assert layers[1][0] == math.ceil(3 * 5120 * 5120 / 1024)
    assert all(n >= 1 for layer in layers for n in layer)
    assert plan.parameters() == sum(map(sum, layers))
    assert abs(plan.parameters() - em.parameter_count(plan.shape) / 1024) < 65 * 10


def test_zero3_partitions_pad_each_layer_to_the_world_size():
    plan = em.plan_for("gpt2-10b", "zero3", 3, scale=1000)
    for layer in range(len(plan.layers())):
        padded = plan.padded_layer(layer)
        assert padded % 3 == 0 and 0 <= padded - sum(plan.layers()[layer]) < 3
    shard = sum(plan.padded_layer(i) // 3 for i in range(len(plan.layers())))
    assert plan.state_elements() == shard
    assert plan.checkpoint_bytes() == 12 * shard
    # two all-gathers and one reduce-scatter, each moving (N-1)/N of the fp16 layer
    assert plan.wire_bytes() == pytest.approx(3 * (2 / 3) * 2 * 3 * shard)


def test_dp_shares_cover_the_parameters_in_equal_padded_pieces():
    total, world = 10, 4
    shares = [em.dp_share(total, world, r) for r in range(world)]
    assert shares == [(0, 3), (3, 3), (6, 3), (9, 3)]
    plan = em.plan_for("gpt2-10b", "dp", 4)
    assert plan.state_elements() == -(-plan.parameters() // 4)
    assert plan.wire_bytes() == pytest.approx(2 * 0.75 * 2 * plan.parameters())


def test_ddp_buckets_cover_every_tensor_once_in_backward_order():
    plan = em.plan_for("gpt2-10b", "dp", 2)
    buckets = plan.buckets()
    flat = [item for bucket in buckets for item in bucket]
    layers = len(plan.layers())
    expected = [(la, t) for la in reversed(range(layers)) for t in reversed(range(10 if la else 3))]
    assert flat == expected
    full = [em.embedding_tensors(plan.shape)] + [em.layer_tensors(plan.shape)] * plan.shape.layers
    sizes = [sum(full[la][t] * em.GRAD_BYTES for la, t in b) for b in buckets]
    # every bucket but the last is closed by the tensor that took it to the 25 MiB cap
    assert all(size >= em.DDP_BUCKET_BYTES for size in sizes[:-1])
    assert all(
        size - full[b[-1][0]][b[-1][1]] * 2 < em.DDP_BUCKET_BYTES
        for size, b in zip(sizes, buckets, strict=True)
    )


def test_compute_follows_eight_flops_per_parameter_and_token():
    plan = em.plan_for("gpt2-20b", "zero3", 4, tflops=2.0)
    expected = 8 * plan.parameters() * em.TOKENS / 2e12
    assert plan.compute_seconds() == pytest.approx(expected)
    forward = sum(plan.layer_seconds(i, "forward") for i in range(len(plan.layers())))
    assert forward == pytest.approx(expected / 4)


def test_compute_override_is_split_by_flops():
    plan = em.plan_for("gpt2-10b", "dp", 2, compute_s=0.5)
    assert plan.compute_seconds() == pytest.approx(0.5)
    ratio = plan.layer_seconds(1, "backward") / plan.layer_seconds(1, "forward")
    assert ratio == pytest.approx(3.0)


def test_default_operating_point_puts_the_checkpoint_at_about_three_quarters_of_compute():
    # The docstring's claim, for every model at 1 gbit on 4 ranks.
    for name in em.MODELS:
        plan = em.plan_for(name, "zero3", 4)
        assert 10e6 < plan.parameters() < 30e6
        checkpoint_s = plan.checkpoint_bytes() / 125e6
        assert 0.6 < checkpoint_s / plan.compute_seconds() < 0.9, name


def test_bad_values_are_config_errors_naming_the_value():
    with pytest.raises(ConfigError, match="unknown model 'gpt2-7b'"):
        em.plan_for("gpt2-7b", "dp", 2)
    with pytest.raises(ConfigError, match="parallel must be one of"):
        em.plan_for("gpt2-10b", "tp", 2)
    with pytest.raises(ConfigError, match="tflops must be"):
        em.plan_for("gpt2-10b", "dp", 2, tflops=-1.0)
