"""benchmarks/: every script runs as `python -m benchmarks.perf.NAME` / `benchmarks.methods.NAME` from the repository
root, and the pieces its figures rest on (vs-TRL settings, provenance, alternating order, spreads) do what they say."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(f"benchmarks.{p.parent.name}.{p.stem}" for folder in ("perf", "methods")
                 for p in (ROOT / "benchmarks" / folder).glob("*.py") if not p.stem.startswith("_"))

HELP_ALL = """
import runpy, sys
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)  # what `python -m NAME --help` runs
    except SystemExit as e:
        assert e.code in (0, None), (name, e.code)
        print("ok", name)
    else:
        raise AssertionError(name + ": --help did not exit")
"""


def test_every_benchmark_runs_with_python_m_from_the_repository_root():
    # One interpreter for all of them (torch is imported once): the test stays cheap.
    done = subprocess.run([sys.executable, "-c", HELP_ALL, *MODULES], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("ok ")] == [f"ok {m}" for m in MODULES]
    assert len(MODULES) >= 13


def test_no_benchmark_module_shadows_a_package():
    packages = {"rl", "rollout", "rewards", "trainers", "envs", "benchmarks"}
    stems = {p.stem for p in (ROOT / "benchmarks").rglob("*.py") if ".trl-venv" not in p.parts}
    assert not stems & packages
    assert not (ROOT / "benchmarks" / "_repo_path.py").exists()


def test_abba_alternates_and_spread_reports_median_and_range():
    from benchmarks._report import abba, spread

    assert abba(["a", "b"], 2) == ["a", "b", "b", "a"]
    assert abba(["a", "b", "c"], 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert spread([1.2, 0.9, 1.0]) == {"median": 1.0, "min": 0.9, "max": 1.2, "n": 3, "values": [1.2, 0.9, 1.0]}


def test_emit_records_command_commit_machine_and_date(tmp_path):
    code = ("import sys; sys.argv = ['x', '--flag']; from benchmarks._report import emit; "
            f"emit({{'figure': 1}}, {str(tmp_path / 'r' / 'out.json')!r})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    result = json.loads((tmp_path / "r" / "out.json").read_text())
    prov = result["provenance"]
    assert result["figure"] == 1
    assert prov["command"].endswith("--flag")
    assert len(prov["commit"].split("+")[0]) == 40
    assert prov["machine"]["cores"] >= 1 and prov["machine"]["cpu"]
    assert prov["date"][:2] == "20"


@pytest.mark.parametrize("changes", [{}, {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "max_new_tokens": 48,
                                          "lr": 1e-4, "lora_r": 8, "lora_alpha": 16.0, "clip_high": 0.2,
                                          "kl_coef": 0.01, "seed": 3, "steps": 5}])
def test_vs_trl_rlpost_job_resolves_to_the_one_settings_object(tmp_path, changes):
    import dataclasses

    from benchmarks.perf.vs_trl import Settings, job_overrides, rlpost_view
    from rl.config import load_job

    s = dataclasses.replace(Settings(), **changes)
    job = load_job("quickstart", job_overrides(s, tmp_path / "run")).model_dump(mode="json")
    view = rlpost_view(job, "MODEL")
    expected = {k: v for k, v in {**s.compared(), "model_dir": "MODEL"}.items() if k != "threads"}
    assert {k: view[k] for k in expected} == expected
    assert job["model"]["path"] == s.model


def test_vs_trl_a_setting_that_differs_stops_the_run_before_timing():
    from benchmarks.perf.vs_trl import Settings, check_same

    expected = Settings().compared()
    # What the old script did: rlpost sampled at the quickstart's 0.7, TRL at a hard-coded 1.0.
    with pytest.raises(SystemExit, match=r"temperature: settings 0\.7, TRL 1\.0"):
        check_same(expected, {**expected, "temperature": 1.0}, "TRL")
    with pytest.raises(SystemExit, match="top_k"):
        check_same(expected, {k: v for k, v in expected.items() if k != "top_k"}, "TRL")
    check_same(expected, dict(expected), "TRL")  # equal: no error


def test_grpo_ma_spike_figures_leave_out_steps_without_reward_variance():
    """GRPO's zero-gradient steps (no group with reward variance) made its gradient norms look spikier than
    GRPO-MA's (README's old claim); over the steps with a signal the stored seed-0 run shows the two equal."""
    from benchmarks.methods.grpo_ma_vs_grpo import summarise_arm

    stored = json.loads((ROOT / "benchmarks/results/grpo_ma_vs_grpo/result.json").read_text())["part_b"]
    def rows(arm):
        s = stored[arm]
        return [{"step": i + 1, "reward/mean": r, "reward/std": 0.0 if r in (0.0, 1.0) else 0.5, "grad_norm": g,
                 "rollout/tokens": 1.0, "time/step_s": 1.0}
                for i, (r, g) in enumerate(zip(s["reward_per_step"], s["grad_norm_per_step"]))]
    grpo, ma = summarise_arm(rows("grpo")), summarise_arm(rows("grpo_ma"))
    assert grpo["grad_norm_cv"] == pytest.approx(0.84, abs=0.01)  # all steps: what README used to compare
    assert grpo["with_signal"]["steps"] == 6 and ma["with_signal"]["steps"] == 8
    assert grpo["with_signal"]["grad_norm_cv"] == pytest.approx(ma["with_signal"]["grad_norm_cv"], abs=0.01)
    assert grpo["with_signal"]["grad_norm_max_over_median"] == pytest.approx(2.31, abs=0.01)


def test_learner_ranks_stops_when_the_arms_jobs_differ_beyond_learners():
    from benchmarks.perf.learner_ranks import check_same_jobs, load, parse

    args = parse(["--smoke"])
    one, two = load(args, 1).model_dump(mode="json"), load(args, 2).model_dump(mode="json")
    assert one["cluster"]["learners"] == 1 and two["cluster"]["learners"] == 2
    check_same_jobs(one, two)  # only cluster.learners differs: no error
    two["algorithm"]["correction"]["level"] = "none"  # what `auto` would resolve to on one rank only
    with pytest.raises(SystemExit, match=r"algorithm\.correction\.level: 1 rank 'token', 2 ranks 'none'"):
        check_same_jobs(one, two)


@pytest.mark.slow
def test_learner_ranks_smoke_shards_parameters_and_adam_state_over_two_real_ranks(tmp_path):
    """The --smoke run (tiny-llama, 2 gloo ranks vs 1): each rank holds its FSDP2 shard only (the memory figures
    count local shards, not the global DTensor sizes), both arms train the same tokens, 1 vs 2 threads per rank."""
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.perf.learner_ranks", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    (one,), two = result["rounds"][0]["1"]["per_rank"], result["rounds"][0]["2"]["per_rank"]
    assert len(two) == 2 and result["threads"] == {"1": [2], "2": [1, 1]}
    total = lambda key: sum(r[key] for r in two)  # noqa: E731
    assert total("param_mib") == pytest.approx(one["param_mib"], abs=0.02)
    assert total("optimizer_mib") == pytest.approx(one["optimizer_mib"], abs=0.02)
    assert all(r["param_plus_optimizer_mib"] < 0.6 * one["param_plus_optimizer_mib"] for r in two)
    assert result["ratios"]["param_per_rank_2_over_1"]["median"] == pytest.approx(0.5, abs=0.05)
    assert result["rounds"][0]["2"]["tokens_trained"] == result["tokens_trained_per_arm"] > 0
