"""The `rl` command line: train, eval, validate, export, jobs.

Heavy modules (torch, transformers, vLLM, Ray) are imported inside the commands, so `rl --help`
answers at once. User errors print one paragraph and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rl.errors import OUT_OF_SPACE, UserError

EPILOG = """examples:
  rl train quickstart                      run the built-in quickstart job
  rl train my_job.yaml trainer.max_steps=5 run a job file with an override
  rl train --resume runs/quickstart        continue from the newest intact checkpoint
  rl eval runs/quickstart/checkpoints/step_20 --job quickstart --samples 8 --k 1 4 8
  rl validate my_job.yaml                  check a job without running it
  rl train-rm rm.yaml data.path=prefs.jsonl train a reward model (Bradley-Terry); export in RUN_DIR/export
  rl export runs/quickstart/checkpoints/step_20 --out merged_model
  rl swarm sapo --nodes 4                  SAPO: 4 nodes sharing rollouts (lock-step, one process)
"""


def cmd_jobs(args: argparse.Namespace) -> int:
    from rl.config import builtin_jobs, load_job

    for name, path in sorted(builtin_jobs().items()):
        first = next((ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{name:12s} {first}")
    del load_job
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rl.config import load_job

    job = load_job(args.job, args.overrides)
    print(f"{args.job}: OK (job {job.name!r}, model {job.model.path}, env {job.env.name}, "
          f"loss {job.algorithm.loss.name}, {job.trainer.max_steps} steps)")
    return 0


def _resume_overrides(args: argparse.Namespace) -> list[str]:
    """The key=value overrides of `--resume RUN_DIR` (argparse puts the first one into `job`); a JOB with it is an
    error: a resumed run keeps its own config file."""
    extra = ([args.job] if args.job else []) + list(args.overrides)
    if any("=" not in item for item in extra):
        raise UserError("give either a JOB or --resume RUN_DIR, not both (a resumed run keeps its own config; "
                        "key=value overrides are allowed).")
    return extra


def cmd_train(args: argparse.Namespace) -> int:
    from rl.loop.driver import resume_job, train_job

    if args.resume:
        return resume_job(args.resume, _resume_overrides(args))
    if not args.job:
        raise UserError("rl train needs a JOB (a YAML file or a built-in job name; see `rl jobs`) or --resume RUN_DIR.")
    from rl.config import load_job

    return train_job(load_job(args.job, args.overrides))


def cmd_train_rm(args: argparse.Namespace) -> int:
    from rl.loop.rm_training import resume_rm_job, train_rm_job

    if args.resume:
        return resume_rm_job(args.resume, _resume_overrides(args))
    if not args.job:
        raise UserError("rl train-rm needs a JOB (a YAML file of an `rl train-rm` job) or --resume RUN_DIR.")
    from rl.config import load_rm_job

    return train_rm_job(load_rm_job(args.job, args.overrides))


def cmd_eval(args: argparse.Namespace) -> int:
    from rl.loop.evaluation import eval_command

    return eval_command(args.target, args.job, args.overrides, samples=args.samples, ks=args.k, out=args.out,
                        num_prompts=args.num_prompts)


def cmd_export(args: argparse.Namespace) -> int:
    from rl.loop.standalone import export_command

    return export_command(args.checkpoint, args.out)


def cmd_swarm(args: argparse.Namespace) -> int:
    from rl.loop.swarm_launcher import launch

    return launch(args.job, args.overrides, args.nodes)


def cmd_swarm_hub(args: argparse.Namespace) -> int:
    import os
    import time

    from rl.netauth import read_token_file
    from rl.swarm.hub import TOKEN_ENV, Hub

    if args.token is not None:
        print("warning: --token shows in `ps` and shell history to anyone on this machine; prefer --token-file "
              f"or the environment variable {TOKEN_ENV}.", file=sys.stderr)
    token = args.token or (read_token_file(args.token_file) if args.token_file else None) or \
        os.environ.get(TOKEN_ENV) or None
    hub = Hub(args.host, args.port, max_messages=args.max_messages, ttl_s=args.ttl_s, token=token,
              rate_per_s=args.rate or None, burst=args.burst, clients_per_ip=args.clients_per_ip,
              tls_cert=args.tls_cert, tls_key=args.tls_key)
    print(f"swarm hub {hub.exposure()} (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        hub.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl", description="rlpost: RL post-training for language models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "train": (cmd_train, "run a job (YAML path or built-in name)"),
        "train-rm": (cmd_train_rm, "train a reward model (Bradley-Terry) on a preference file"),
        "eval": (cmd_eval, "evaluate a checkpoint, model directory or alias on a job's held-out split"),
        "validate": (cmd_validate, "check a job without running it"),
        "export": (cmd_export, "write a Hugging Face model directory from a checkpoint (adapters merged)"),
        "jobs": (cmd_jobs, "list built-in jobs"),
        "swarm": (cmd_swarm, "run N SAPO nodes of a job (lock-step, processes + hub, or Ray actors)"),
        "swarm-hub": (cmd_swarm_hub, "serve the HTTP hub SAPO nodes on several machines share rollouts through"),
    }
    subs = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in commands.items()}
    for name, (fn, _) in commands.items():
        subs[name].set_defaults(func=fn)
    for name, what in (("train", "YAML job file or built-in job name"), ("train-rm", "YAML reward-model job file")):
        subs[name].add_argument("job", nargs="?", help=what)
        subs[name].add_argument("overrides", nargs="*", help="key.path=value overrides")
        subs[name].add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest intact checkpoint")
    subs["validate"].add_argument("job")
    subs["validate"].add_argument("overrides", nargs="*")
    subs["eval"].add_argument("target", help="checkpoint directory, model directory or alias")
    subs["eval"].add_argument("--job", required=True, help="the job whose env, rewards and sampling to use")
    subs["eval"].add_argument("overrides", nargs="*")
    subs["eval"].add_argument("--samples", type=int, default=None, metavar="N",
                              help="sampled completions per prompt besides the greedy one (eval.samples; pass@k is "
                                   "estimated from all N)")
    subs["eval"].add_argument("--k", type=int, nargs="+", default=None, metavar="K",
                              help="pass@k values to report, each <= N (eval.k; default 1, 2, 4, ... below N, and N; "
                                   "pass@1 always); put key=value overrides before --k")
    subs["eval"].add_argument("--num-prompts", type=int, default=None, help="held-out prompts to score")
    subs["eval"].add_argument("--out", help="report path (default: <target>/eval.json or ./eval.json)")
    subs["export"].add_argument("checkpoint")
    subs["export"].add_argument("--out", required=True)
    subs["swarm"].add_argument("job", help="YAML job file or built-in job name (with a swarm: section)")
    subs["swarm"].add_argument("overrides", nargs="*", help="key.path=value overrides for every node")
    subs["swarm"].add_argument("--nodes", type=int, default=4, help="number of nodes (default 4)")
    subs["swarm-hub"].add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    subs["swarm-hub"].add_argument("--port", type=int, default=8765)
    subs["swarm-hub"].add_argument("--max-messages", type=int, default=4096,
                                   help="messages kept (when full, the sender holding the most loses its oldest)")
    subs["swarm-hub"].add_argument("--ttl-s", type=float, default=600.0, help="seconds a message is kept")
    hub_auth = subs["swarm-hub"].add_mutually_exclusive_group()
    hub_auth.add_argument("--token-file", metavar="PATH",
                          help="file holding the shared token nodes must send (default: $RLPOST_SWARM_TOKEN); "
                               "required beyond loopback")
    hub_auth.add_argument("--token", help="the shared token itself (visible in `ps`: prefer --token-file)")
    subs["swarm-hub"].add_argument("--rate", type=float, default=50.0, metavar="PER_S",
                                   help="requests per second per client (token bucket; 0 = no limit; default 50)")
    subs["swarm-hub"].add_argument("--burst", type=int, default=500, help="bucket size per client (default 500)")
    subs["swarm-hub"].add_argument("--clients-per-ip", type=int, default=16, metavar="N",
                                   help="an address may use N clients' rate (0 = no per-address limit, e.g. behind a "
                                        "reverse proxy; default 16)")
    subs["swarm-hub"].add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    subs["swarm-hub"].add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # A disk that fills outside a checkpoint (metrics, eval reports, plots): checkpoints handle their own
        # (rl/loop/checkpoint.py); here nothing is lost but the current step, since checkpoints are atomic.
        if args.debug or exc.errno not in OUT_OF_SPACE:
            raise
        print(f"error: no space left on the device while writing {exc.filename or 'a run file'}. Free space there; "
              "every checkpoint written so far is intact: continue with `rl train --resume RUN_DIR`.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
