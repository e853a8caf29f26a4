"""What trains in each stage: gradients, backward compute, BatchNorm statistics, param groups, LRs."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn as nn

from transfer.errors import ScheduleError
from transfer.model.freezing import backbone_blocks, set_trainable
from transfer.model.module import ClassifierModule
from transfer.model.optim import build_optimizer, cosine_schedule, param_groups
from transfer.model.stage import Stage, parse_stages

STAGES = [
    Stage("head", 1, unfreeze=0, lr=1e-3),
    Stage("top", 1, unfreeze=2, lr=1e-4, warmup_epochs=1),
    Stage("all", 1, unfreeze="all", lr=1e-5, layer_decay=0.5),
]


class Staged(ClassifierModule):
    """The module with a schedule to pick stages from by number, as the plan's stages are."""

    def __init__(self, *args, stages=STAGES, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.schedule = list(stages)

    def use(self, index: int):  # type: ignore[no-untyped-def]
        return self.set_stage(self.schedule[index], index)


def make_module(name: str = "test_efficientnet", stages=STAGES) -> Staged:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    return Staged(
        model,
        ["a", "b", "c"],
        functools.partial(torch.optim.AdamW, weight_decay=0.05),
        backbone_name=name,
        input_config={},
        stages=stages,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_steps(module: ClassifierModule, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        optimizer.step()


def changed_keys(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_vit"])
def test_head_only_changes_nothing_but_the_head_bitwise(name: str) -> None:
    module = make_module(name)
    module.use(0)
    before = snapshot(module.model)
    train_steps(module)
    changed = changed_keys(before, snapshot(module.model))
    head = {k for k in before if k.startswith(module.model.pretrained_cfg["classifier"] + ".")}
    assert changed == head  # frozen weights and BatchNorm running statistics are bit-identical


def test_partial_unfreeze_updates_only_the_last_blocks_and_their_bn_stats() -> None:
    module = make_module()
    module.use(1)  # head + last 2 blocks
    blocks = backbone_blocks(module.model)
    trainable_names = {n for block in blocks[-2:] for n in block}
    before = snapshot(module.model)
    train_steps(module)
    changed = changed_keys(before, snapshot(module.model))
    frozen_prefixes = {n.rsplit(".", 1)[0] for block in blocks[:-2] for n in block}
    assert not any(k.rsplit(".", 1)[0] in frozen_prefixes for k in changed)
    assert any(k.endswith("running_mean") for k in changed)  # unfrozen BN layers do adapt
    assert trainable_names <= {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_freeze_bn_keeps_statistics_of_unfrozen_blocks() -> None:
    stages = [Stage("top", 1, unfreeze=2, lr=1e-4, freeze_bn=True)]
    module = make_module(stages=stages)
    module.use(0)
    before = snapshot(module.model)
    train_steps(module)
    changed = changed_keys(before, snapshot(module.model))
    assert changed and not any("running_" in k for k in changed)


def test_frozen_parts_get_no_gradient_and_no_backward_graph() -> None:
    module = make_module()
    module.use(1)
    blocks = backbone_blocks(module.model)
    first_trainable = blocks[-2][0].rsplit(".", 2)[0]  # e.g. blocks.4 for test_efficientnet
    outputs = {}
    frozen_module = module.model.get_submodule(blocks[0][0].rsplit(".", 1)[0])
    frozen_module.register_forward_hook(lambda m, i, o: outputs.setdefault("frozen", o))
    module.train()
    module(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not outputs["frozen"].requires_grad  # autograd recorded nothing for the frozen prefix
    for name, param in module.model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    assert first_trainable


def test_frozen_modules_stay_in_eval_after_lightning_switches_modes() -> None:
    module = make_module()
    module.use(0)
    module.eval()
    module.train()  # what Lightning does after every validation loop
    assert not module.model.blocks.training and not module.model.bn1.training
    assert module.model.classifier.training


def test_each_stage_optimizer_holds_exactly_its_trainable_params_with_its_lrs() -> None:
    module = make_module()
    seen_counts = []
    for index, stage in enumerate(STAGES):
        module.use(index)
        config = build_optimizer(module.model, stage, module.optimizer_factory, total_steps=10, steps_per_epoch=10)
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        trainable = {id(p) for p in module.model.parameters() if p.requires_grad}
        assert in_optimizer == trainable
        seen_counts.append(len(in_optimizer))
        # the scheduler knows every group (it was built after them) and starts from the stage LR
        assert len(scheduler.base_values) == len(optimizer.param_groups)
        assert max(scheduler.base_values) == pytest.approx(stage.lr)
        for group in optimizer.param_groups:  # biases and norm weights get no weight decay
            if all(p.ndim <= 1 for p in group["params"]):
                assert group["weight_decay"] == 0.0
    assert seen_counts[0] < seen_counts[1] < seen_counts[2]
    scales = sorted({g.get("lr_scale", 1.0) for g in param_groups(module.model, STAGES[2], 0.05)})
    assert len(scales) > 2 and scales[0] < scales[-1] * 0.1  # layer-wise decay gives earlier layers less


def test_warmup_then_cosine_in_every_group_scaled_by_its_layer_decay() -> None:
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD(
        [{"params": [weights[0]], "lr": 0.1}, {"params": [weights[1]], "lr": 0.1, "lr_scale": 0.5}], lr=0.1
    )
    scheduler = cosine_schedule(optimizer, Stage("s", 1, lr=0.1, min_lr_ratio=0.01), total_steps=100, warmup_steps=10)
    curve = []
    for step in range(101):
        scheduler.step_update(step)
        curve.append([group["lr"] for group in optimizer.param_groups])
    first = [lr for lr, _ in curve]
    assert first[0] == pytest.approx(0.1 / 11) and first[0] < first[5] < first[9] < 0.1  # (step + 1) / 11 of lr
    assert first[10] == pytest.approx(0.1) and first[55] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert first[100] == pytest.approx(0.1 * 0.01)
    assert [half for _, half in curve] == pytest.approx([lr * 0.5 for lr in first])


def test_impossible_schedules_are_explained() -> None:
    model = timm.create_model("test_resnet", num_classes=2)
    with pytest.raises(ScheduleError, match="has 5"):
        set_trainable(model, 50)
    with pytest.raises(ScheduleError, match="unknown key"):
        parse_stages([{"epochs": 1, "lr": 1e-3, "unfreze": 2}])
    with pytest.raises(ScheduleError):
        parse_stages([])


# unfreeze: 1 must train the last feature stage (with the norm timm puts after it) and the head, nothing else.
LAST_STAGE = {
    "test_resnet": (("layer4.", "fc."), ["head: fc", "layer4"]),
    "test_efficientnet": (
        ("blocks.4.", "conv_head.", "bn2.", "classifier."),
        ["head: classifier", "blocks.4 + conv_head + bn2"],
    ),
    # timm groups head.norm with the classifier: a "block" of one LayerNorm unless it joins stages.3.
    "test_convnext": (("stages.3.", "head.norm.", "head.fc."), ["head: head.fc", "stages.3 + head.norm"]),
    "test_vit": (("blocks.5.", "norm.", "head."), ["head: head", "blocks.5 + norm"]),
    # VGG's last stage is its fc6/fc7 MLP (timm's pre_logits), ahead of the new classifier.
    "vgg11": (("pre_logits.", "head.fc."), ["head: head", "pre_logits"]),
}


@pytest.mark.parametrize("name", sorted(LAST_STAGE))
def test_unfreezing_one_block_trains_the_last_feature_stage_and_names_it(name: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=3)
    prefixes, groups = LAST_STAGE[name]
    trainable = set_trainable(model, 1)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert list(trainable.groups) == groups
    head_only = set_trainable(model, 0)
    assert head_only.groups == (groups[0],) and "head only" in head_only.describe()
    # A head-only stage leaves the pre-logits norm frozen: the pooled features stay the backbone's.
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("head.norm"))


def test_timm_sync_batchnorm_keeps_the_fused_activations_and_the_outputs() -> None:
    import copy

    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    from transfer.training.sync_batchnorm import TimmSyncBatchNorm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    expected = model(images)
    untouched = copy.deepcopy(model)
    plugin = TimmSyncBatchNorm()
    synced = plugin.apply(model)
    assert any(isinstance(m, SyncBatchNormAct) for m in synced.modules())
    assert not any(type(m) is torch.nn.SyncBatchNorm for m in synced.modules())  # none lost its activation
    torch.testing.assert_close(synced.eval()(images), expected)
    assert plugin.apply(synced) is synced  # each stage's Trainer applies it again: no second conversion
    # torch's own conversion (Lightning's default plugin) drops the activations: other outputs.
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(untouched).eval()
    assert not torch.allclose(plain(images), expected, atol=1e-3)
    reverted = plugin.revert(synced)
    assert any(isinstance(m, BatchNormAct2d) for m in reverted.modules())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in reverted.modules())
    torch.testing.assert_close(reverted.eval()(images), expected)


def test_a_splitter_must_cover_every_parameter_once() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert [len(b) for b in backbone_blocks(model, splitter=lambda m: [m[0], m[2]])] == [2]
    with pytest.raises(ScheduleError, match="1 parameter"):
        set_trainable(model, 1, splitter=lambda m: [[m[0].weight], m[2]])  # m[0].bias in no group
    with pytest.raises(ScheduleError, match="in several"):
        set_trainable(model, 1, splitter=lambda m: [m[0], m[0], m[2]])
    trainable = set_trainable(model, 0, splitter=lambda m: [m[0], ["2.weight", "2.bias"]])
    assert trainable.groups == ("head: 2",) and not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_small_datasets_get_enough_epochs_for_the_minimum_steps() -> None:
    from tests.fixtures import compose_config
    from transfer.training.planner import schedule_stages

    cfg = compose_config(["schedule.min_steps=50"])
    # one step per epoch (18 images, batch 32): at most 50 epochs each, the patience noted too
    stages, notes = schedule_stages(cfg, [], steps=1, val_images=4)
    assert [s.epochs for s in stages] == [50, 50] and len(notes) == 3
    # 55 steps per epoch (ELPV, 197 validation images): the epochs as the schedule gives them,
    # patience auto becomes 4 epochs, min_delta half a validation image
    stages, notes = schedule_stages(cfg, [], steps=55, val_images=197)
    assert stages == [Stage(**{**s, "patience": 4, "min_delta": 0.5 / 197}) for s in compose_config([]).schedule.stages]
    assert len(notes) == 1 and "patience auto: 4 epoch(s) for 197 validation image(s)" in notes[0]
    # an epochs given in the overrides is kept as written
    stages, notes = schedule_stages(
        compose_config(["schedule.stages.1.epochs=2"]), ["schedule.stages.1.epochs=2"], 1, 4
    )
    assert [s.epochs for s in stages] == [50, 2] and len(notes) == 2


def test_patience_and_min_delta_follow_the_validation_set_size() -> None:
    from tests.fixtures import compose_config
    from transfer.training.planner import schedule_stages
    from transfer.training.stopping import auto_min_delta, auto_patience, plateau_rule

    # 30 validation images: accuracy moves in steps of 3.3 points; 2,000: in steps of 0.05
    assert auto_patience(30, steps_per_epoch=20) == 5 and auto_min_delta(30, "max") == pytest.approx(1 / 60)
    assert auto_patience(2000, steps_per_epoch=20) == 3 and auto_min_delta(2000, "max") == pytest.approx(1 / 4000)
    assert [auto_patience(n, 100) for n in (1, 9, 10, 99, 100, 999, 1000, 10**6)] == [6, 6, 5, 5, 4, 4, 3, 3]
    # never fewer epochs than 10 optimizer steps; a metric to minimise counts any decrease
    assert auto_patience(2000, steps_per_epoch=1) == 10 and auto_min_delta(30, "min") == 0.0
    assert plateau_rule(30, 20, "max", 0.02).min_delta == 0.02  # schedule.min_delta given
    # the plan: auto resolved, a given patience kept, null never stops, no validation split no patience
    cfg = compose_config(["schedule.stages.1.patience=7", "schedule.stages.0.patience=null"])
    stages, _ = schedule_stages(cfg, [], steps=55, val_images=30)
    assert [(s.patience, s.min_delta) for s in stages] == [(None, 0.0), (7, pytest.approx(1 / 60))]
    stages, _ = schedule_stages(compose_config([]), [], steps=55, val_images=0)
    assert [s.patience for s in stages] == [None, None]


def test_steps_per_epoch_follow_the_loaders_batching(image_folder) -> None:
    from transfer.data.datamodule import ImageDataModule
    from transfer.data.sources import image_folder as folder_source
    from transfer.data.splits import split_indices
    from transfer.data.transforms import eval_transform

    table = folder_source(image_folder)
    config = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear"}
    datamodule = ImageDataModule(
        table,
        split_indices(table.labels, 0.2, 0.1, 42),
        eval_transform(config),
        eval_transform(config),
        (32, 32),
        batch_size=8,
        num_workers=0,
    )
    train_images = len(datamodule.splits["train"])
    loader = datamodule.loader(datamodule.dataset("train"), True, None)
    assert datamodule.train_steps_per_epoch() == len(loader) == train_images // 8
    assert datamodule.train_steps_per_epoch(accumulate=2) == (train_images // 8) // 2


def test_a_tie_in_the_validation_score_keeps_the_later_checkpoint() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from transfer.training.stage_bests import LatestBestCheckpoint, StageBests

    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=lambda decision: decision))
    for mode, best, tie, worse in (("max", 1.0, 1.0, 0.5), ("min", 0.2, 0.2, 0.3)):
        ours, lightnings = (
            LatestBestCheckpoint(monitor="val/acc", mode=mode, save_top_k=1),
            ModelCheckpoint(monitor="val/acc", mode=mode, save_top_k=1),
        )
        for callback in (ours, lightnings):
            callback.best_k_models, callback.kth_best_model_path = {"epoch00.ckpt": torch.tensor(best)}, "epoch00.ckpt"
        assert ours.check_monitor_top_k(trainer, torch.tensor(tie))
        assert not lightnings.check_monitor_top_k(trainer, torch.tensor(tie))  # Lightning keeps the first
        assert not ours.check_monitor_top_k(trainer, torch.tensor(worse))
    bests = StageBests("max")
    bests.records = [
        {"stage": "head", "path": "h.ckpt", "score": 1.0},
        {"stage": "finetune", "path": "f.ckpt", "score": 1.0},
        {"stage": "extra", "path": "e.ckpt", "score": 0.5},
    ]
    assert bests.best()["stage"] == "finetune"
