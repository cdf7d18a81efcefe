"""Sharded checkpoints (rl/loop/policy_state.py) reshard on load: a checkpoint written by 2 FSDP2 ranks (gloo)
resumes on 1 process, and one written by 1 process resumes on 2 ranks, each continuing exactly as the run that
was not interrupted (fp32): the loaded weights and Adam moments are the saved ones bit for bit, and the next
update matches to 1e-6. For full fine-tuning and for LoRA, with the trainer's own AdamW and warm-up schedule
(whose state, as in `trainer.pt`, is saved beside the shards).

One test runs: the 1-process run here (update 1, save, update 2), then 2 spawned ranks that run the same steps
sharded (update 1, save, update 2) and also load the 1-process checkpoint and make update 2 from it, then here
the 2-rank checkpoint is loaded and update 2 made from it. Both ranks see the whole batch, so FSDP2's averaged
gradients are the 1-process gradients and the uninterrupted runs agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim.lr_scheduler import LRScheduler

from rl.config import load_job
from rl.loop.checkpoint import weights_writer
from rl.loop.distributed import free_port, join_group
from rl.loop.learner import PolicyLearner
from rl.loop.policy_state import is_sharded, load_policy_state, save_policy_state
from rl.models import load_causal_lm, resolve_model
from trainers.adapters import adapter_state_dict, apply_adapter
from trainers.adapters.core import ADAPTER_NAME
from trainers.schedule import build_optimizer

ADAPTERS = {"full": None, "lora": "{name: lora, r: 4, alpha: 8}"}
TRAINER = ["trainer.lr=1e-2", "trainer.weight_decay=0.1", "trainer.warmup_steps=2"]
TIMEOUT_S = 120


Run = tuple[torch.nn.Module, torch.optim.Optimizer, LRScheduler]


def build(adapter: str | None, sharded: bool) -> Run:
    """tiny-llama (with the adapter), FSDP2-sharded per decoder layer then the root when `sharded`, and the
    trainer's AdamW (decay and no-decay groups) with its schedule."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    job = load_job("tiny", [*([f"adapter={adapter}"] if adapter else []), *TRAINER])
    model = apply_adapter(load_causal_lm(resolve_model("tiny-llama"), "float32", "cpu"), job.adapter)
    model.eval()  # no dropout: both runs compute the same function
    if sharded:
        for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
            fully_shard(layer)
        fully_shard(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(trainable, job.trainer, total_updates=10)
    return model, optimizer, scheduler


def update(run: Run, step: int) -> None:
    model, optimizer, scheduler = run
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(step))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def save(run: Run, directory: Path) -> None:
    """What a checkpoint holds of the policy: the shards (every rank) and the schedule (rank 0's `trainer.pt`)."""
    save_policy_state(run[0], run[1], directory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(run[2].state_dict(), directory / "trainer.pt")


def load(run: Run, directory: Path) -> None:
    run[2].load_state_dict(torch.load(directory / "trainer.pt"))
    load_policy_state(run[0], run[1], directory)


def full_state(run: Run) -> dict[str, Any]:
    """Trainable weights and optimizer state, gathered whole on CPU (on rank 0, empty on the others; on one
    process as they are)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    gathered = dist.is_initialized()
    options = StateDictOptions(full_state_dict=gathered, cpu_offload=gathered, ignore_frozen_params=True)
    weights, optim = get_state_dict(run[0], run[1], options=options)
    moments = {f"{fqn}/{k}": v for fqn, s in optim.get("state", {}).items() for k, v in s.items()}
    rates = {f"lr/{i}": torch.tensor(float(g["lr"])) for i, g in enumerate(run[1].param_groups)}
    tensors = {k: v for k, v in {**weights, **moments}.items() if isinstance(v, torch.Tensor)}
    return {k: v.detach().cpu().clone() for k, v in {**tensors, **rates}.items()} if tensors else {}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(got) == sorted(want)
    worst = max((float((got[k].double() - want[k].double()).abs().max()), k) for k in want)
    assert worst[0] <= atol, f"max abs difference {worst[0]:.3g} at {worst[1]}"


def two_ranks(rank: int, port: int, work: str, adapter: str | None) -> None:
    """One of 2 ranks: the sharded run (update 1, save, update 2), then a fresh sharded model resumed from the
    1-process checkpoint (update 2). Rank 0 saves the gathered states for the test to compare."""
    torch.set_num_threads(1)
    join_group(rank, 2, "127.0.0.1", port, "cpu", TIMEOUT_S)
    out = Path(work)
    try:
        run = build(adapter, sharded=True)
        update(run, 1)
        saved = full_state(run)
        save(run, out / "ckpt_2ranks")
        update(run, 2)
        uninterrupted = full_state(run)

        run = build(adapter, sharded=True)
        load(run, out / "ckpt_1rank")
        loaded = full_state(run)
        update(run, 2)
        resumed = full_state(run)
        if rank == 0:
            torch.save({"saved": saved, "uninterrupted": uninterrupted, "loaded": loaded, "resumed": resumed},
                       out / "two_ranks.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_two_ranks(work: Path, adapter: str | None) -> None:
    context = mp.start_processes(two_ranks, args=(free_port(), str(work), adapter), nprocs=2, join=False,
                                 start_method="spawn")
    waited = 0.0
    while not context.join(timeout=5):
        waited += 5
        if waited > TIMEOUT_S:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2 ranks did not finish within {TIMEOUT_S}s")


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_a_sharded_checkpoint_resumes_exactly_at_another_number_of_ranks(kind, tmp_path, tiny_model_dir):
    adapter = ADAPTERS[kind]
    run = build(adapter, sharded=False)  # the 1-process run
    update(run, 1)
    saved_1 = full_state(run)
    save(run, tmp_path / "ckpt_1rank")
    update(run, 2)
    uninterrupted_1 = full_state(run)
    assert is_sharded(tmp_path / "ckpt_1rank")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spawn_two_ranks(tmp_path, adapter)
    two = torch.load(tmp_path / "two_ranks.pt")
    assert len(list((tmp_path / "ckpt_2ranks" / "policy").glob("*.distcp"))) == 2  # each rank wrote its shards

    # 1 -> 2: the sharded ranks hold exactly what one process saved, and continue as it did
    assert_close(two["loaded"], saved_1, atol=0.0)
    assert_close(two["resumed"], uninterrupted_1, atol=1e-6)

    # 2 -> 1: one process holds exactly what the 2 ranks saved, and continues as they did
    run = build(adapter, sharded=False)
    fresh = full_state(run)
    load(run, tmp_path / "ckpt_2ranks")
    assert_close(full_state(run), two["saved"], atol=0.0)
    update(run, 2)
    assert_close(full_state(run), two["uninterrupted"], atol=1e-6)

    # the test can fail: update 1 moved the weights, so a load that changed nothing would be caught above
    weights = [k for k in fresh if "/" not in k]
    assert any(not torch.equal(fresh[k], two["saved"][k]) for k in weights), "update 1 changed no weight"


# ----- the learner: every adapter, in the sharded format and in the single-file format it replaced ---------------
LEARNER_ADAPTERS = {"full": None, "lora": ADAPTERS["lora"], "bone": "{name: bone, r: 4}",
                    "rosa": "{name: rosa, r: 4, density: 0.01}", "paca": "{name: paca, r: 4}"}


def learner_for(kind: str, model_dir: str, seed: int) -> PolicyLearner:
    adapter = LEARNER_ADAPTERS[kind]
    overrides = [*([f"adapter={adapter}"] if adapter else []), "trainer.device=cpu", f"seed={seed}", *TRAINER]
    return PolicyLearner(load_job("tiny", overrides), model_dir)


def fake_update(learner: PolicyLearner) -> None:
    """One optimizer update from seeded gradients (and, for RoSA, a chosen mask): a state no fresh learner has."""
    from trainers.adapters.rosa_schedule import rosa_layers

    generator = torch.Generator().manual_seed(7)
    for layer in rosa_layers(learner.model):
        nnz = layer.rosa_spa_values[ADAPTER_NAME].numel()
        layer.set_mask(ADAPTER_NAME, torch.randperm(layer.out_features * layer.in_features, generator=generator)[:nnz])
    for _name, p in learner.trainer.trainable_named_parameters():
        p.grad = 0.1 * torch.randn(p.shape, generator=generator)
    learner.trainer.optimizer.step()
    learner.trainer.scheduler.step()
    learner.trainer.optimizer.zero_grad(set_to_none=True)
    learner.trainer.updates += 1


def policy_of(learner: PolicyLearner) -> dict[str, torch.Tensor]:
    """Everything that defines the policy (an adapter's PEFT state dict holds its persistent buffers too), the
    optimizer's moments by parameter name, and the learning rates."""
    model, trainer = learner.model, learner.trainer
    weights = adapter_state_dict(model) if learner.job.adapter else dict(model.state_dict())
    names = {id(p): n for n, p in trainer.trainable_named_parameters()}
    moments = {f"{names[id(p)]}/{k}": v for p, s in trainer.optimizer.state.items() for k, v in s.items()}
    rates = {f"lr/{i}": torch.tensor(g["lr"]) for i, g in enumerate(trainer.optimizer.param_groups)}
    return {k: v.detach().clone() for k, v in {**weights, **moments, **rates}.items()}


@pytest.mark.parametrize("kind", sorted(LEARNER_ADAPTERS))
def test_the_learner_resumes_every_adapter_exactly(kind, tiny_model_dir, tmp_path):
    """save_policy / load_policy through the real PolicyLearner: a learner built with another seed (another init,
    other PaCA columns) holds exactly the saved policy, optimizer and schedule afterwards; and so it does from the
    single-file format (`weights.safetensors`, optimizer in `trainer.pt`) that older checkpoints have."""
    learner = learner_for(kind, tiny_model_dir, seed=0)
    fake_update(learner)
    want = policy_of(learner)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    trainer_state = learner.save_policy(str(sharded))
    assert "optimizer" not in trainer_state and trainer_state["updates"] == 1 and is_sharded(sharded)
    single = tmp_path / "single"
    single.mkdir()
    weights = adapter_state_dict(learner.model) if learner.job.adapter else learner.model.state_dict()
    old_trainer_state = weights_writer(weights, learner.trainer.state_dict())(single)

    for directory, state in ((sharded, trainer_state), (single, old_trainer_state)):
        other = learner_for(kind, tiny_model_dir, seed=1)
        before = policy_of(other)
        assert any(not torch.equal(before[k], v) for k, v in want.items() if k in before), "nothing to restore"
        other.load_policy(str(directory), state)
        got = policy_of(other)
        assert sorted(got) == sorted(want), directory.name
        for k, v in want.items():
            assert torch.equal(got[k], v), (directory.name, k)
        assert other.trainer.updates == 1
        assert other.trainer.scheduler.state_dict() == learner.trainer.scheduler.state_dict()
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            assert torch.equal(other.model(ids).logits, learner.model(ids).logits), directory.name
