"""The training loop without Ray: steps, metrics, hooks, resume, DDP on gloo."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autopose.data import CocoCropDataset
from autopose.engine.checkpoint import load_model
from autopose.engine.config import AugmentSpec, BilevelConfig, DataConfig, ModelConfig, TrainConfig
from autopose.engine.train import EpochReport, Trainer, TrainHooks
from autopose.errors import AutoposeError

TINY = {
    "pyramid_channels": 16,
    "parallel_channels": (16, 16, 16, 16),
    "parallel_stages": 1,
    "refine_channels": 16,
    "refine_blocks": (1, 1, 1, 1),
}
SPACE = {
    "name": "tiny",
    "num_sub_policies": 2,
    "ops_per_sub_policy": 1,
    "ops": {"Rotate": [-45.0, 45.0], "Brightness": [0.1, 1.9], "Cutout": [0.0, 0.5]},
}


def configs(data: dict[str, Path], **train) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    settings = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 4, "threads_per_worker": 1, "ohkm_topk": 4}
    settings.update(train)
    return (
        DataConfig(train=str(data["train"]), val=str(data["val"])),
        ModelConfig(arch="p2net_r18", input_size=(64, 48), options=dict(TINY)),
        TrainConfig(**settings),
    )


class Recorder(TrainHooks):
    def __init__(self):
        self.reports: list[EpochReport] = []

    def on_epoch_end(self, report: EpochReport, trainer: Trainer) -> None:
        self.reports.append(report)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


def test_counts_steps_reports_every_epoch_and_scores_ap(smoke_data):
    data, model, train = configs(smoke_data, epochs=3, lr_milestones=[2])
    trainer = Trainer(data, model, train, AugmentSpec(kind="handcrafted", seed=0), SPACE)
    hooks = Recorder()
    result = trainer.run(hooks)
    assert result.steps == 3 * 2 == trainer.step
    assert [r.epoch for r in hooks.reports] == [0, 1, 2]
    assert [r.is_last for r in hooks.reports] == [False, False, True]
    assert [r.step for r in hooks.reports] == [2, 4, 6]
    for report in hooks.reports:
        assert 0.0 <= report.metrics["val_ap"] <= 1.0
        assert math.isfinite(report.metrics["train_loss"]) and report.metrics["train_loss"] > 0
    assert [r.metrics["lr"] for r in hooks.reports] == pytest.approx([1e-3, 1e-3, 1e-4])
    assert trainer.policy_document()["kind"] == "handcrafted"


# every option of the search step on, with a policy step every 3rd step: a resumed run starts at
# step 2, a plain step, and its search step 3 reports a cosine with step 0's hypergradient and
# averages the pose term over steps 1 (before the checkpoint), 2 and 3
SEARCH_OPTIONS = BilevelConfig(
    policy_lr=0.05,
    policy_every=3,
    policy_optimizer="normalized",
    batchnorm_path=0.5,
    pose_path=0.5,
    pose_every_step=True,
    appearance_moments=True,
)


@pytest.mark.parametrize("kind", ["random", "search", "search-options"])
def test_resumed_run_matches_the_uninterrupted_one(smoke_data, tmp_path, kind):
    """Epoch 1 from the checkpoint of epoch 0 = epoch 1 of a run that never stopped:
    same optimizer-step count, same weights, same policy, same metrics."""
    bilevel = SEARCH_OPTIONS if kind == "search-options" else BilevelConfig(policy_lr=0.05)
    spec = AugmentSpec(
        kind=kind.removesuffix("-options"), seed=3, bilevel=bilevel if kind != "random" else None
    )
    steps = 1 if kind == "search" else 2  # the bi-level step costs about five plain ones
    data, model, train = configs(smoke_data, steps_per_epoch=steps)

    straight = Trainer(data, model, train, spec, SPACE)
    straight.run()

    first = Trainer(data, model, train, spec, SPACE)
    first.run(epochs=1)
    assert first.step == steps and first.epoch == 1
    first.save(tmp_path / "checkpoint.pt")
    resumed = Trainer(data, model, train, spec, SPACE)
    resumed.load(tmp_path / "checkpoint.pt")
    assert (resumed.step, resumed.epoch) == (steps, 1)
    resumed.run()

    assert resumed.step == straight.step == 2 * steps
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], value, msg=name)
    assert resumed.policy_document() == straight.policy_document()
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"])
    if kind.startswith("search"):
        probabilities = [v for k, v in resumed.policy_metrics().items() if k.startswith("op_prob/")]
        assert sum(probabilities) == pytest.approx(1.0)
        assert resumed.history[-1]["val_loss"] > 0
    if kind == "search-options":
        cosine = straight.history[-1]["policy_grad_cosine"]
        assert resumed.history[-1]["policy_grad_cosine"] == pytest.approx(cosine, rel=1e-6)


@pytest.mark.parametrize(
    ("hessian", "engine", "central"),
    [
        ("finite_difference", "finite_difference", True),
        ("forward_difference", "finite_difference", False),
        ("exact", "exact", True),
    ],
)
def test_the_configs_hessian_picks_the_search_steps_second_order_term(smoke_data, hessian, engine, central):
    """``search.hessian``: the central difference, the one-sided one (the search reuses the
    weight step's image gradient at ``w``) or the exact product."""
    data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=1)
    bilevel = BilevelConfig(policy_lr=0.05, hessian=hessian)
    trainer = Trainer(data, model, train, AugmentSpec(kind="search", seed=0, bilevel=bilevel), SPACE)
    assert (trainer.search.hessian, trainer.search.central) == (engine, central)


def test_the_policy_steps_every_kth_step_and_its_metrics_average_over_those(smoke_data):
    """``policy_every: 3``: steps 0 and 3 of 5 are search steps; the others train the weights on
    the relaxed policy without moving it; ``val_loss`` is the mean over the search steps only,
    ``train_loss`` over all."""
    from autopose.engine.search import NormalizedGradientDescent

    data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=5)
    bilevel = BilevelConfig(policy_lr=0.05, policy_every=3, policy_optimizer="normalized")
    trainer = Trainer(data, model, train, AugmentSpec(kind="search", seed=0, bilevel=bilevel), SPACE)
    assert isinstance(trainer.policy_optimizer, NormalizedGradientDescent)
    search_steps, val_losses, train_losses = [], [], []
    search_step, plain_step = trainer.search.step, trainer._plain_step

    def recorded_search_step(*args, **kwargs):
        search_steps.append(trainer.step)
        metrics = search_step(*args, **kwargs)
        val_losses.append(metrics["val_loss"])
        train_losses.append(metrics["train_loss"])
        return metrics

    def checked_plain_step(*args, **kwargs):
        before = [p.detach().clone() for p in trainer.augment.parameters()]
        metrics = plain_step(*args, **kwargs)
        assert all(torch.equal(a, p) for a, p in zip(before, trainer.augment.parameters(), strict=True))
        train_losses.append(metrics["train_loss"])
        return metrics

    trainer.search.step = recorded_search_step
    trainer._plain_step = checked_plain_step
    metrics = trainer.run().history[-1]
    assert search_steps == [0, 3] and len(train_losses) == 5
    assert metrics["val_loss"] == pytest.approx(sum(val_losses) / 2)
    assert metrics["train_loss"] == pytest.approx(sum(train_losses) / 5)
    assert "policy_grad_cosine" in metrics and "policy_grad_norm/magnitude_logits" in metrics


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("policy_every", 0, "≥ 1"),
        ("batchnorm_path", -0.5, "≥ 0"),
        ("policy_optimizer", "sgd", "'normalized'"),
        ("sampling", "soft", "'hard'"),
        ("choice_gradient", "reinforce", "'score'"),
        ("hessian", "second", "'forward_difference'"),
        ("init_magnitude", 10.0, "(0, 10)"),
        ("init_magnitude", 0.0, "(0, 10)"),
        ("tau1", (0.5, 2.0), "range"),  # ranges get their values once, where a trial is planned
    ],
)
def test_a_bad_search_option_is_refused_naming_the_field(smoke_data, option, value, words):
    data, model, train = configs(smoke_data)
    bilevel = BilevelConfig(**{option: value})
    with pytest.raises(AutoposeError, match=words) as error:
        Trainer(data, model, train, AugmentSpec(kind="search", seed=0, bilevel=bilevel), SPACE)
    assert error.value.field == f"search.{option}"


def test_the_search_config_reaches_the_relaxed_policy(smoke_data):
    """``sampling`` and ``init_magnitude`` reach the RelaxedPolicy the Trainer builds; the
    defaults are today's soft mix, started off the identity."""
    from autopose.augment import RelaxedPolicy

    data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=1)
    default = Trainer(data, model, train, AugmentSpec(kind="search", seed=0), SPACE).augment
    assert isinstance(default, RelaxedPolicy) and default.hard is False
    # Rotate in [-45°, 45°] and Brightness in [0.1, 1.9] are signed, identity at m = 5: started
    # halfway to m = 10; Cutout in [0, 0.5] is not: m = 5.
    started = default.magnitude_tensor().detach()
    torch.testing.assert_close(started[..., :2], torch.full_like(started[..., :2], 7.5))
    torch.testing.assert_close(started[..., 2], torch.full_like(started[..., 2], 5.0))

    bilevel = BilevelConfig(sampling="hard", init_magnitude=3.0, policy_lr=0.05)
    trainer = Trainer(data, model, train, AugmentSpec(kind="search", seed=0, bilevel=bilevel), SPACE)
    assert trainer.augment.hard is True
    started = trainer.augment.magnitude_tensor().detach()
    torch.testing.assert_close(started, torch.full_like(started, 3.0))
    trainer.run()  # a hard search step runs through the bi-level step
    assert trainer.step == 1 and trainer.history[-1]["val_loss"] > 0

    scored = BilevelConfig(sampling="hard", choice_gradient="score", policy_lr=0.05)
    trainer = Trainer(data, model, train, AugmentSpec(kind="search", seed=0, bilevel=scored), SPACE)
    assert trainer.search.choice_gradient == "score"
    trainer.run()
    assert trainer.step == 1 and trainer.history[-1]["val_loss"] > 0


def test_the_policy_metrics_hold_each_signed_ops_direction_and_the_exported_share(smoke_data):
    from autopose.augment.policy import LEGACY_SIGN_LOGIT

    data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=1)
    trainer = Trainer(data, model, train, AugmentSpec(kind="search", seed=0), SPACE)
    metrics = trainer.policy_metrics()
    # signs start at 1/2; Cutout is unsigned and has none
    assert {k: v for k, v in metrics.items() if k.startswith("op_sign/")} == {
        "op_sign/Rotate": pytest.approx(0.5),
        "op_sign/Brightness": pytest.approx(0.5),
    }
    # K = 2 sub-policies of one step over 3 ops: 6 combinations, each near 1/6 ≥ 1%: all kept
    assert metrics["exported_share"] == pytest.approx(1.0)
    assert len(trainer.policy_document()["sub_policies"]) == 6

    policy = trainer.augment
    with torch.no_grad():
        policy.sign_logits[:, :, 0] = LEGACY_SIGN_LOGIT  # Rotate: always at value(m)
        policy.op_logits.zero_()
        policy.op_logits[:, :, 2] = math.log(18.0)  # Cutout 90%, Rotate and Brightness 5% each
    metrics = trainer.policy_metrics()
    assert metrics["op_sign/Rotate"] == pytest.approx(1.0)
    assert metrics["op_sign/Brightness"] == pytest.approx(0.5)
    assert metrics["exported_share"] == pytest.approx(1.0)  # every combination ≥ 0.5 · 5%
    with torch.no_grad():
        policy.op_logits[:, :, 2] = math.log(198.0)  # Cutout 99%, the others 0.5 · 0.5% < 1% each
    assert trainer.policy_metrics()["exported_share"] == pytest.approx(0.99)
    assert [s[0]["op"] for s in trainer.policy_document()["sub_policies"]] == ["Cutout", "Cutout"]


def _without_sign_logits(state: dict) -> dict:
    """A search checkpoint's training state as it was before ``sign_logits`` existed: the policy
    without it, its optimizer's group and state without its last parameter."""
    old = dict(state)
    old["policy"] = {k: v for k, v in state["policy"].items() if k != "sign_logits"}
    optimizer = state["policy_optimizer"]
    (group,) = optimizer["param_groups"]
    last = group["params"][-1]
    old["policy_optimizer"] = {
        "state": {i: s for i, s in optimizer["state"].items() if i != last},
        "param_groups": [{**group, "params": group["params"][:-1]}],
    }
    old.pop("search")  # older still: no previous hypergradient either
    return old


def test_a_search_checkpoint_from_before_the_signs_resumes(smoke_data, tmp_path):
    """A checkpoint whose policy has no ``sign_logits`` and whose policy optimizer lists 4
    parameters resumes: the 4 keep their values and Adam moments, ``sign_logits`` loads at
    LEGACY_SIGN_LOGIT with no state, and the next search step trains all 5."""
    from autopose.augment.policy import LEGACY_SIGN_LOGIT

    data, model, train = configs(smoke_data, steps_per_epoch=1)
    spec = AugmentSpec(kind="search", seed=3, bilevel=BilevelConfig(policy_lr=0.05))
    first = Trainer(data, model, train, spec, SPACE)
    first.run(epochs=1)
    state = _without_sign_logits(first.state_dict())
    assert len(state["policy_optimizer"]["param_groups"][0]["params"]) == 4
    with pytest.raises(ValueError, match="size"):  # what torch alone says of it
        Trainer(data, model, train, spec, SPACE).policy_optimizer.load_state_dict(state["policy_optimizer"])

    resumed = Trainer(data, model, train, spec, SPACE)
    resumed.load_state_dict(state, weights(first))
    assert (resumed.step, resumed.epoch) == (1, 1)
    policy = resumed.augment
    for name, value in state["policy"].items():
        torch.testing.assert_close(policy.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert torch.all(policy.sign_logits == LEGACY_SIGN_LOGIT)
    parameters = list(policy.parameters())
    for i, parameter in enumerate(parameters[:4]):
        saved = state["policy_optimizer"]["state"][i]
        torch.testing.assert_close(resumed.policy_optimizer.state[parameter]["exp_avg"], saved["exp_avg"])
    assert parameters[4] is policy.sign_logits and not resumed.policy_optimizer.state[parameters[4]]
    # the state handed in is not changed (a caller may load it again)
    assert len(state["policy_optimizer"]["param_groups"][0]["params"]) == 4

    resumed.run()
    assert resumed.step == 2 and resumed.history[-1]["val_loss"] > 0
    steps = [float(resumed.policy_optimizer.state[p]["step"]) for p in parameters]
    assert steps == [2.0, 2.0, 2.0, 2.0, 1.0]


def test_checkpoint_is_an_ordinary_model_checkpoint(smoke_data, tmp_path):
    data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=1)
    trainer = Trainer(data, model, train, AugmentSpec(kind="none"), SPACE)
    trainer.run()
    path = trainer.save(tmp_path / "c.pt")
    net, meta = load_model(path)
    assert meta["arch"] == "p2net_r18" and meta["input_size"] == (64, 48)
    assert meta["extra"]["training_state"]["step"] == 1
    assert net(torch.rand(1, 3, 64, 48)).shape == (1, 17, 16, 12)


def test_model_input_must_match_the_proxy(smoke_data):
    data, model, train = configs(smoke_data)
    model.input_size = (128, 96)
    with pytest.raises(AutoposeError, match="64x48") as error:
        Trainer(data, model, train, AugmentSpec(kind="none"), SPACE)
    assert error.value.field == "model.input_size"


def test_the_policy_step_reads_the_held_out_split_when_given(smoke_data, tmp_path):
    from autopose.data import build_proxy
    from autopose.data.proxy import ProxyDataset

    data, model, train = configs(smoke_data)
    search = AugmentSpec(kind="search", seed=0, bilevel=BilevelConfig(trials=1))
    assert len(Trainer(data, model, train, search, SPACE).search_val_set) == len(ProxyDataset(data.val))
    data.search_val = str(smoke_data["train"])  # stands in for a held-out split: other rows than val
    trainer = Trainer(data, model, train, search, SPACE)
    assert (
        len(trainer.search_val_set) == len(ProxyDataset(smoke_data["train"])) != len(ProxyDataset(data.val))
    )
    trainer.run(epochs=1)
    assert trainer.step == 2

    other = tmp_path / "other-size.parquet"
    val_source = Path(smoke_data["val"]).parent / "val"
    build_proxy(
        val_source / "annotations.json", val_source / "images", other, input_size=(32, 24), progress=False
    )
    data.search_val = str(other)
    with pytest.raises(AutoposeError) as error:
        Trainer(data, model, train, search, SPACE)
    assert error.value.field == "data.search_val" and str(other) in str(error.value)


def _ddp_worker(rank: int, world: int, store: str, data: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data_config, model, train = configs(data, epochs=1, steps_per_epoch=2)
        trainer = Trainer(data_config, model, train, AugmentSpec(kind="random", seed=0), SPACE)
        trainer.sampler.set_epoch(0)
        shard = list(iter(trainer.sampler))
        result = trainer.run()
        # parameters only: BatchNorm's running statistics follow each rank's own batches
        checksum = float(sum(p.detach().double().sum() for p in trainer.net.parameters()))
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "ddp": isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel),
                    "shard": shard,
                    "steps": result.steps,
                    "val_ap": result.history[-1]["val_ap"],
                    "checksum": checksum,
                }
            )
        )
    finally:
        dist.destroy_process_group()


def test_ddp_on_gloo_shards_the_data_and_keeps_the_ranks_in_step(smoke_data, tmp_path):
    data = {k: str(v) for k, v in smoke_data.items()}
    # fork: the test module is not importable by name in a spawned child (importlib import mode)
    args = (2, str(tmp_path / "store"), data, str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["ddp"] for r in ranks)
    assert not set(ranks[0]["shard"]) & set(ranks[1]["shard"])
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert ranks[0]["val_ap"] == ranks[1]["val_ap"]  # rank 0 scores, every rank reports it
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)  # DDP kept them equal


def test_the_targets_sigma_comes_from_the_model_config_or_the_input_size(smoke_data):
    data, model, train = configs(smoke_data, epochs=1)
    assert Trainer(data, model, train, AugmentSpec(kind="none"), SPACE).codec.sigma == 2.0
    model = dataclasses.replace(model, heatmap_sigma=1.5)
    assert Trainer(data, model, train, AugmentSpec(kind="none"), SPACE).codec.sigma == 1.5


def test_trains_on_coco_crops_made_on_the_fly(smoke_data, coco_ann, coco_images):
    """Full training reads a COCO file and its images directly (no proxy cache)."""
    _, model, train = configs(smoke_data, epochs=1, steps_per_epoch=1)
    data = DataConfig(train_ann=str(coco_ann), train_images=str(coco_images), val=str(smoke_data["val"]))
    trainer = Trainer(data, model, train, AugmentSpec(kind="handcrafted", seed=0), SPACE)
    assert len(trainer.train_set) == 12  # the bundled persons with keypoints
    result = trainer.run()
    assert result.steps == 1 and math.isfinite(result.history[-1]["train_loss"])


def test_crops_made_on_the_fly_come_on_a_canvas_cut_after_the_policy(smoke_data, coco_ann, coco_images):
    _, model, train = configs(smoke_data, epochs=1, steps_per_epoch=1)
    data = DataConfig(
        train_ann=str(coco_ann), train_images=str(coco_images), val=str(smoke_data["val"]), train_margin=2.0
    )
    trainer = Trainer(data, model, train, AugmentSpec(kind="handcrafted", seed=0), SPACE)
    assert trainer.canvas_pad == (32, 24)
    plain = CocoCropDataset(trainer.train_set.instances, (64, 48))
    canvas, crop = trainer.train_set[0], plain[0]
    assert canvas["image"].shape == (3, 128, 96)
    # the same affine sampling of the same image: the crop is the canvas's middle, pixel for pixel
    assert (canvas["image"][:, 32:-32, 24:-24].int() - crop["image"].int()).abs().max() <= 1
    labelled = crop["visibility"] > 0
    moved = crop["keypoints"][labelled] + torch.tensor([24.0, 32.0])
    assert torch.allclose(canvas["keypoints"][labelled], moved, atol=1e-4)
    seen: list[tuple[int, ...]] = []
    trainer.net.register_forward_pre_hook(lambda _, inputs: seen.append(tuple(inputs[0].shape[-2:])))
    trainer.run()
    assert set(seen) >= {(64, 48)} and (128, 96) not in seen


# -- the warm start and the holdout split ------------------------------------------------------------
def test_a_warm_start_begins_from_the_checkpoints_weights_with_a_fresh_optimizer(smoke_data, tmp_path):
    data, model, train = configs(smoke_data, epochs=1)
    base = Trainer(data, model, train, AugmentSpec(kind="none"), SPACE)
    base.run()
    path = base.save(tmp_path / "base.pt")
    _, _, warm = configs(smoke_data, epochs=1, init_from=str(path), seed=5)
    trainer = Trainer(data, model, warm, AugmentSpec(kind="random", seed=1), SPACE)
    for name, value in weights(base).items():
        torch.testing.assert_close(trainer.net.state_dict()[name], value, rtol=0, atol=0)
    assert trainer.step == 0 and trainer.epoch == 0 and not trainer.optimizer.state
    cold = Trainer(data, model, configs(smoke_data, epochs=1, seed=5)[2], AugmentSpec(kind="none"), SPACE)
    assert any(not torch.equal(cold.net.state_dict()[k], v) for k, v in weights(base).items())


def test_a_warm_start_of_another_network_is_refused_naming_the_field(smoke_data, tmp_path):
    data, model, train = configs(smoke_data, epochs=1)
    path = Trainer(data, model, train, AugmentSpec(kind="none"), SPACE).save(tmp_path / "base.pt")
    wider = ModelConfig(arch="p2net_r18", input_size=(64, 48), options={**TINY, "refine_channels": 32})
    _, _, warm = configs(smoke_data, init_from=str(path))
    with pytest.raises(AutoposeError, match="refine_channels") as error:
        Trainer(data, wider, warm, AugmentSpec(kind="none"), SPACE)
    assert error.value.field == "train.init_from"
    with pytest.raises(AutoposeError, match="platform resolves") as error:
        Trainer(data, model, configs(smoke_data, init_from="runs:/abc")[2], AugmentSpec(kind="none"), SPACE)
    with pytest.raises(AutoposeError, match="checkpoint not found") as error:
        configs(smoke_data, init_from=str(tmp_path / "missing.pt"))[2]._check(None, "train")
    assert error.value.field == "train.init_from"


def test_the_holdout_split_is_scored_once_at_the_end(smoke_data):
    data, model, train = configs(smoke_data, epochs=2)
    data = DataConfig(train=data.train, val=data.val, search_val=data.val)
    hooks = Recorder()
    Trainer(data, model, train, AugmentSpec(kind="none"), SPACE).run(hooks)
    assert ["holdout_ap" in r.metrics for r in hooks.reports] == [False, True]
    # the holdout here is the val split itself: the same crops, the same AP
    assert hooks.reports[-1].metrics["holdout_ap"] == hooks.reports[-1].metrics["val_ap"]


# -- policy schedules ---------------------------------------------------------------------------------
def _policy(op: str, p: float, m: float) -> dict:
    return {"format": "autopose.policy/1", "space": "tiny", "sub_policies": [[{"op": op, "p": p, "m": m}]]}


def test_a_run_resumed_with_another_policy_exports_the_schedule_it_trained_with(smoke_data, tmp_path):
    """Population Based Augmentation hands a member another's checkpoint and a perturbed policy:
    the run's policy file then holds both, each from the step it started at."""
    data, model, train = configs(smoke_data)
    first, second = _policy("Rotate", 0.5, 7.0), _policy("Cutout", 0.3, 4.0)
    donor = Trainer(data, model, train, AugmentSpec(kind="policy", seed=0, policy=first), SPACE)
    donor.run(epochs=1)
    assert donor.policy_document() == first
    donor.save(tmp_path / "donor.pt")
    member = Trainer(data, model, train, AugmentSpec(kind="policy", seed=0, policy=second), SPACE)
    member.load(tmp_path / "donor.pt")
    member.run()
    schedule = member.policy_document()
    assert schedule["format"] == "autopose.schedule/1" and schedule["steps"] == 4
    assert schedule["schedule"] == [{"start_step": 0, "policy": first}, {"start_step": 2, "policy": second}]
    # a plain retry (the same policy) continues the schedule it had
    member.save(tmp_path / "member.pt")
    retried = Trainer(data, model, train, AugmentSpec(kind="policy", seed=0, policy=second), SPACE)
    retried.load(tmp_path / "member.pt")
    assert retried.policy_document() == schedule


def test_a_schedule_switches_policies_at_its_steps_stretched_to_the_run(smoke_data):
    data, model, train = configs(smoke_data, epochs=2, steps_per_epoch=2)
    never, always = _policy("Rotate", 0.0, 9.0), _policy("Brightness", 1.0, 0.0)
    document = {
        "format": "autopose.schedule/1",
        "space": "tiny",
        "steps": 8,  # found in a training twice as long: the switch at 4 of 8 lands on 2 of 4
        "schedule": [{"start_step": 0, "policy": never}, {"start_step": 4, "policy": always}],
    }
    trainer = Trainer(data, model, train, AugmentSpec(kind="policy", seed=0, policy=document), SPACE)
    assert [start for start, _ in trainer.augment.entries] == [0, 2] and trainer.augment.steps == 4
    seen = []
    original = trainer._targets

    def spy(keypoints, visibility):
        seen.append((trainer.step, trainer.augment.policy_at(trainer.augment.step).to_dict()))
        return original(keypoints, visibility)

    trainer._targets = spy
    trainer.run()
    assert seen == [(0, never), (1, never), (2, always), (3, always)]
    assert trainer.policy_document()["steps"] == 4  # what it trained with, at this run's steps


def test_an_epoch_longer_than_the_data_does_its_steps_on_a_fresh_shuffle(smoke_data):
    """steps_per_epoch is the count done (was: capped silently at one pass; newcomer issue)."""
    data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=1)
    one_pass = len(Trainer(data, model, train, AugmentSpec(kind="none", seed=0), SPACE).loader)
    data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=one_pass + 2)
    trainer = Trainer(data, model, train, AugmentSpec(kind="none", seed=0), SPACE)
    orders = []
    sampler = trainer.loader.sampler
    original = sampler.set_epoch
    sampler.set_epoch = lambda epoch: (original(epoch), orders.append(list(iter(sampler))))[0]
    result = trainer.run()
    assert result.steps == trainer.step == one_pass + 2
    assert trainer.history[-1]["step"] == one_pass + 2
    assert len(orders) == 2 and sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


@pytest.mark.parametrize("kind", ["handcrafted", "search"])
def test_a_canvas_train_proxy_runs_the_policy_on_the_canvas_and_trains_on_the_crop(smoke_data, kind):
    """The smoke train proxy stores each 64×48 crop on a 96×72 canvas: batches arrive as canvases,
    the policy (a search's too, in its unrolled step) runs on them, and the network sees crops."""
    data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=2)
    trainer = Trainer(data, model, train, AugmentSpec(kind=kind, seed=0), SPACE)
    assert trainer.canvas_pad == (16, 12)
    assert next(iter(trainer.loader))["image"].shape[-2:] == (96, 72)
    seen: list[tuple[int, ...]] = []
    trainer.net.register_forward_pre_hook(lambda _, inputs: seen.append(tuple(inputs[0].shape[-2:])))
    losses = trainer.train_epoch()
    assert seen and set(seen) == {(64, 48)}
    assert all(math.isfinite(v) for v in losses.values())


def test_loader_processes_feed_the_batches_the_main_process_reads(smoke_data):
    """``train.loader_workers`` (kept across the epoch's passes) changes who decodes, not what."""
    losses = []
    for workers in (0, 2):
        data, model, train = configs(smoke_data, epochs=1, steps_per_epoch=6, loader_workers=workers)
        trainer = Trainer(data, model, train, AugmentSpec(kind="none"), SPACE)
        assert trainer.loader.persistent_workers == (workers > 0)
        losses.append(trainer.run().history[-1]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_the_appearance_target_is_the_search_val_splits_crops(smoke_data, monkeypatch):
    """A search with ``appearance_moments`` and ``pose_every_step`` compares its batches with the
    appearance moments of the val split's crops as the loader gives them; at most
    ``APPEARANCE_TARGET_SAMPLES`` of them, the first in file order."""
    from autopose.augment.policy import as_float_images
    from autopose.engine import train as train_module
    from autopose.engine.search import appearance_descriptors, feature_moments

    data, model, train = configs(smoke_data, steps_per_epoch=1)
    spec = AugmentSpec(kind="search", seed=3, bilevel=SEARCH_OPTIONS)
    trainer = Trainer(data, model, train, spec, SPACE)
    split = trainer.search_val_set
    images = as_float_images(torch.stack([split[i]["image"] for i in range(len(split))]))
    assert len(split) > 3

    def moments(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = appearance_descriptors(crops)
        return feature_moments(features, torch.ones(features.shape[0], dtype=torch.bool))

    for got, expected in zip(trainer.search.appearance_target, moments(images), strict=True):
        torch.testing.assert_close(got, expected)
    monkeypatch.setattr(train_module, "APPEARANCE_TARGET_SAMPLES", 3)
    for got, expected in zip(trainer._split_appearance_moments(split), moments(images[:3]), strict=True):
        torch.testing.assert_close(got, expected)
