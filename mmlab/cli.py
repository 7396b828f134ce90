"""``mmlab`` command line: info | train-tiny | eval | sweep | collect | figures | reproduce | bench-tasks."""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time


def _parse_params(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"method parameter {it!r} must look like name=value (e.g. keep_ratio=0.25)")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_info(args) -> int:
    import torch
    import transformers

    import mmlab
    from mmlab.arch.tiny_llava import CHECKPOINT_DIR
    from mmlab.models import EMBEDDED, TINY_VARIANTS

    print(f"mmlab {mmlab.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"threads {torch.get_num_threads()}  cuda {torch.cuda.is_available()}")
    print(f"embedded models: {', '.join(EMBEDDED)}  (tiny checkpoints in {CHECKPOINT_DIR})")
    mod = [f"{n} (" + ("trained" if (CHECKPOINT_DIR / n / "routers.pt").exists()
                       else f"not trained: mmlab train-tiny --mod {n.rsplit('-', 1)[1]}") + ")"
           for n in TINY_VARIANTS if n.endswith("mod")]
    print(f"tiny-llava with trained MoD routers (method mod_trained): {', '.join(mod)}")
    dpn = ("trained" if (CHECKPOINT_DIR / "tiny-llava-dpn" / "dpn.pt").exists()
           else "not trained: mmlab train-tiny --dpn")
    print(f"tiny-llava-deep with trained DPN pooling routers (method dpn_experts): tiny-llava-dpn ({dpn})")
    for name in EMBEDDED:  # a checkpoint whose training is not finished says so
        info = CHECKPOINT_DIR / name / "training.json"
        status = json.loads(info.read_text()).get("status") if info.exists() else None
        if status:
            print(f"{name}: experimental, {status}")
    print(f"methods: {', '.join(mmlab.methods.available())}")
    if args.model:
        b = mmlab.load(args.model)
        print(f"{args.model}: adapter={b.adapter.name} layers={b.n_layers} dims={b.dims()} "
              f"loaded in {b.load_seconds:.1f}s")
    return 0


def cmd_train_tiny(args) -> int:
    from mmlab.arch.tiny_llava import CHECKPOINT_DIR
    from mmlab.tiny.train import train

    steps = {} if args.steps is None else {"steps": args.steps}
    if args.dpn:  # fine-tune tiny-llava-deep with DPN's pooling routers -> tiny-llava-dpn
        from mmlab.tiny.dpn import train_dpn

        if args.model != "tiny-llava":
            raise ValueError(f"--dpn fine-tunes tiny-llava-deep into tiny-llava-dpn; drop --model {args.model}")
        train_dpn(**steps, batch_size=args.batch_size, seed=args.seed, routing=args.dpn, out=args.out)
        return 0
    if args.mod and args.model != "tiny-llava":
        raise ValueError(f"--mod fine-tunes tiny-llava; it does not combine with --model {args.model}")
    if args.dynamic:  # Dynamic-LLaVA's vision predictor on the frozen model, saved beside its checkpoint
        from mmlab.tiny.dynamic import train_dynamic

        if args.model == "smol-llava":
            raise ValueError("--dynamic trains on tiny-llava or tiny-llava-deep (the Llama decoder it writes out)")
        train_dynamic(args.model, **steps, batch_size=args.batch_size, seed=args.seed, out=args.out)
        return 0
    if args.dynamic_text:  # Dynamic-LLaVA's output-text predictor on the frozen text LM
        from mmlab.tiny.dynamic import train_dynamic_text

        if args.model != "tiny-llava":
            raise ValueError(f"--dynamic-text trains on the text LM smollm2-135m; drop --model {args.model}")
        train_dynamic_text(**steps, seed=args.seed, out=args.out)
        return 0
    if args.model == "smol-llava":
        from mmlab.models import smollm2_dir
        from mmlab.tiny.smol import train as train_smol

        train_smol(smollm2_dir(), **steps, seed=args.seed, out=args.out or CHECKPOINT_DIR / "smol-llava")
        return 0
    if args.model == "tiny-llava-deep":  # 12 LLM layers from scratch, a system turn, tiny-llava's tower to start
        from mmlab.tiny.model import SYSTEM

        train(**{"steps": 3000, **steps}, batch_size=args.batch_size, lr=args.lr, seed=args.seed, text_layers=12,
              system=SYSTEM, vision_from=CHECKPOINT_DIR / "tiny-llava", out=args.out or CHECKPOINT_DIR / args.model)
        return 0
    if args.mod:  # fine-tune the shipped tiny-llava with MoD routing (p-MoD or gamma-MoD)
        from mmlab.tiny.mod import train_mod

        train_mod(args.mod, **steps, batch_size=args.batch_size, seed=args.seed, out=args.out)
        return 0
    train(**steps, batch_size=args.batch_size, lr=args.lr, vision_steps=args.vision_steps, seed=args.seed,
          out=args.out or CHECKPOINT_DIR / "tiny-llava")
    return 0


def cmd_eval(args) -> int:
    import mmlab

    methods = mmlab.methods.parse(args.methods)  # fail fast, before loading
    if args.param and sum(m.isidentifier() for m in args.method) != 1:
        raise ValueError("--param sets the parameters of the one --method given by bare name; write the others' "
                         "in their spec: --method fastv --param keep_ratio=0.25 --method 'h2o(budget=0.5)'")
    for m in args.method:  # composed in the order given, after --methods
        methods += [mmlab.methods.get(m, **_parse_params(args.param))] if m.isidentifier() else mmlab.methods.parse(m)
    b = mmlab.load(args.model)
    if not b.multimodal:
        from mmlab.data.text import offline_corpus

        r = mmlab.perplexity(b, offline_corpus(), methods, window=args.window, context=args.context,
                             max_windows=args.n_samples)
        kept = {} if math.isnan(r.generated_kept) else {"generated_kept": r.generated_kept}
        print(json.dumps({"model": args.model, "methods": [str(m) for m in methods], "perplexity": r.perplexity,
                          "tokens": r.n_tokens, "kv_bytes": r.kv_bytes, **kept}, indent=1))
        return 0
    samples = mmlab.data.shapes(n=args.n_samples, seed=args.seed, split="test")
    r = mmlab.evaluate(b, samples, methods)
    print(json.dumps({"model": args.model, "methods": [str(m) for m in methods], **r.metrics()}, indent=1))
    return 0


def cmd_sweep(args) -> int:
    from mmlab.batch import collect, load_sweep, run_sweep

    sweep = load_sweep(args.yaml)  # every validation error surfaces here, before any run
    counts = run_sweep(sweep, jobs=args.jobs, progress=not args.quiet, cluster=args.cluster,
                       threads_per_run=args.threads_per_run)
    print(f"sweep {sweep.name}: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} already done "
          f"of {counts['total']} -> {sweep.output}")
    if not args.no_collect:
        collect(sweep.output)
    return min(counts["failed"], 100)  # the exit code says how many runs failed


def cmd_bench_tasks(args) -> int:
    """Print the folder of mmlab's lmms-eval tasks (written on first use), for ``--include_path``."""
    from mmlab.bench import tasks_dir

    print(tasks_dir(args.root))
    return 0


def cmd_collect(args) -> int:
    from mmlab.batch import collect

    df = collect(args.run_dir)
    runs = df.drop_duplicates("run_id")
    n_ok = int((runs.status == "ok").sum())
    print(f"{len(runs)} runs ({n_ok} ok), {len(df)} rows -> {args.run_dir}/results.csv, results.parquet")
    return 0


def cmd_figures(args) -> int:
    from mmlab.report import build_figures, write_tables

    tables = args.out or "papers/results"  # --out moves the figures and every table
    for p in (build_figures(args.runs, args.out, force=args.force) + write_tables(args.runs, tables, force=args.force)
              + write_paper_tables(args.runs, out=tables)):
        print(p)
    return 0


def write_paper_tables(runs_root: str, recipes: str = "sweeps/paper", out: str = "papers/results") -> list:
    """``papers/results/paper_NAME.md``: each recipe's paper numbers beside ours, once its runs are collected."""
    from pathlib import Path

    import pandas as pd

    from mmlab.batch import load_sweep
    from mmlab.report import paper_table

    written = []
    for y in sorted(Path(recipes).glob("*.yaml")):
        sweep = load_sweep(y)
        table = sweep.output / "results.csv"
        if not table.exists():
            print(f"skip paper vs ours for {y.stem}: no {table} (run `mmlab sweep {y}` on a GPU with the hub)")
            continue
        df = paper_table(sweep.paper, pd.read_csv(table))
        p = Path(out) / f"paper_{y.stem}.md"
        p.write_text(f"# {y.stem}: paper vs ours\n\nPaper: {sweep.paper['source']}. Ours: `{table}`.\n\n"
                     + df.to_markdown(index=False, floatfmt=".4g") + "\n")
        written.append(p)
    return written


def cmd_reproduce(args) -> int:
    """The main job on the embedded defaults: tiny-llava accuracy (+ random pruning) and SmolLM2 perplexity."""
    import mmlab
    from mmlab.data.text import corpus_id, offline_corpus

    t0 = time.time()
    b = mmlab.load("tiny-llava")
    samples = mmlab.data.shapes(n=args.n_samples, seed=args.seed, split="test")
    rows = []
    for label, methods in [("dense", []), ("random keep 10%", [mmlab.methods.get("random", keep_ratio=0.1)])]:
        r = mmlab.evaluate(b, samples, methods)
        rows.append({"model": "tiny-llava", "setting": label, **r.metrics()})
    s = mmlab.load("smollm2-135m")
    p = mmlab.perplexity(s, offline_corpus(), window=512, max_windows=args.ppl_windows)
    rows.append({"model": "smollm2-135m", "setting": f"{corpus_id()} ppl", "perplexity": p.perplexity,
                 "tokens": p.n_tokens})
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        print(json.dumps(r))
    (out / "foundation.json").write_text(json.dumps(rows, indent=1))

    # every default sweep in one pool (longest runs first), then the figures and tables from the collected tables
    from mmlab.batch import collect, load_sweep, run_sweeps
    from mmlab.report import build_figures, write_tables

    sweeps = [load_sweep(p) for p in sorted(Path("sweeps").glob("*.yaml"))]  # all validated before any runs
    done = run_sweeps(sweeps, jobs=args.jobs, cluster=args.cluster, threads_per_run=args.threads_per_run)
    for sw in sweeps:
        collect(sw.output)
    for p in build_figures() + write_tables():
        print(p)
    failed = sum(c["failed"] for c in done.values())
    print(f"{'sweep':<18} {'runs':>5} {'failed':>6} {'wall s':>8} {'run s':>8}")
    for name, c in done.items():
        print(f"{name:<18} {c['ok'] + c['failed']:>5} {c['failed']:>6} {c['wall_s']:>8.0f} {c['seconds']:>8.0f}")
    print(f"reproduce finished in {time.time() - t0:.0f} s ({failed} failed runs)")
    return min(failed, 100)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmlab", description="mmlab: efficient multimodal LLM inference workbench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    p = sub.add_parser("info", help="versions, embedded models, registered methods")
    p.add_argument("--model", help="also load this model and print its dimensions")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("train-tiny", help="train an embedded VLM on the synthetic shapes data (CPU)")
    p.add_argument("--model", choices=["tiny-llava", "tiny-llava-deep", "smol-llava"], default="tiny-llava",
                   help="tiny-llava (from scratch, about 18 min on 2 cores); tiny-llava-deep (12 LLM layers from "
                        "scratch + a system turn, tiny-llava's tower to start, about 45 min); smol-llava "
                        "(experimental: the real SmolLM2 frozen, tower / projector / low-rank deltas trained, "
                        "resumable)")
    p.add_argument("--steps", type=int, help="tiny-llava: stage-2 (VQA) steps (4000); tiny-llava-deep: 3000; "
                                             "--mod: 1500; smol-llava: steps of 4 scenes (1000)")
    p.add_argument("--vision-steps", type=int, default=1500, help="stage-1 (vision tower + patch probe) steps")
    p.add_argument("--batch-size", type=int, default=32,
                   help="about this many sequences per stage-2 step (up to 4 questions per image)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training data and initialisation")
    p.add_argument("--out", help="output folder (default: the shipped checkpoint inside the package)")
    p.add_argument("--mod", choices=["pmod", "gmod"],
                   help="instead: fine-tune tiny-llava with Mixture-of-Depths routing -> tiny-llava-pmod / -gmod "
                        "(p-MoD: PRD schedule, per-layer routers; gamma-MoD: ARank-chosen layers, shared router); "
                        "(about 4 minutes on 2 cores)")
    p.add_argument("--dynamic", action="store_true",
                   help="instead: train Dynamic-LLaVA's vision predictor on the frozen --model (600 steps), saved "
                        "beside its checkpoint (method dynamic_llava)")
    p.add_argument("--dynamic-text", action="store_true",
                   help="instead: train Dynamic-LLaVA's output-text predictor on the frozen smollm2-135m (150 steps, "
                        "15 min), shipped with the package (method dynamic_llava_decode)")
    p.add_argument("--dpn", nargs="?", const="router", choices=["router", "random"],
                   help="instead: fine-tune tiny-llava-deep with DPN's pooling routers (sampled experts, hinge loss; "
                        "600 steps, 10 min) -> tiny-llava-dpn (method dpn_experts); --dpn random: the official random-"
                        "expert fine-tune (the control) -> tiny-llava-dpn-random")
    p.set_defaults(fn=cmd_train_tiny)

    p = sub.add_parser("eval", help="evaluate a model (VQA accuracy, or perplexity for a text LM)")
    p.add_argument("--model", default="tiny-llava", help="an embedded name (tiny-llava, smollm2-135m), a Hugging Face "
                                                         "id or a local folder")
    p.add_argument("--methods", default="", help='method spec, e.g. "divprune(keep_ratio=0.098)+snapkv(budget=0.5)"')
    p.add_argument("--method", action="append", default=[],
                   help="a method name or spec, repeatable: composed in order after --methods")
    p.add_argument("--param", action="append", default=[],
                   help="parameter name=value of the one --method NAME (repeatable)")
    p.add_argument("--n-samples", type=int, default=200,
                   help="test questions (multimodal models) or perplexity windows of --window tokens (text LMs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test questions drawn")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens (text LMs)")
    p.add_argument("--context", type=int, help="text LMs: prefill this many tokens of each window (methods compress "
                                              "there) and score the rest as a continuation, decoded token by token "
                                              "under decode-time methods (default: the whole window in one prefill)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("reproduce", help="the main job on the embedded defaults")
    p.add_argument("--n-samples", type=int, default=400, help="tiny-llava test questions")
    p.add_argument("--seed", type=int, default=0, help="seed of the test questions drawn")
    p.add_argument("--ppl-windows", type=int, default=16, help="SmolLM2 perplexity windows of 512 tokens")
    p.add_argument("--out", default="runs/reproduce", help="folder of the foundation numbers (foundation.json)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="parallel sweep runs")
    _cluster_args(p)
    p.set_defaults(fn=cmd_reproduce)

    p = sub.add_parser("sweep", help="run a notebook over a parameter grid with papermill (resumable)")
    p.add_argument("yaml", help="sweeps/NAME.yaml")
    p.add_argument("-j", "--jobs", type=int, default=1, help="parallel runs (each its own process and kernel)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-collect", action="store_true", help="do not write results.csv / .parquet at the end")
    _cluster_args(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("bench-tasks", help="write mmlab's lmms-eval tasks (mmlab_shapes, ...) and print their "
                                            "folder, for lmms-eval --include_path")
    p.add_argument("--root", default=None, help="parent folder (default $MMLAB_CACHE/lmms_tasks)")
    p.set_defaults(fn=cmd_bench_tasks)

    p = sub.add_parser("collect", help="gather a sweep's runs into results.csv and results.parquet")
    p.add_argument("run_dir", help="runs/NAME")
    p.set_defaults(fn=cmd_collect)

    p = sub.add_parser("figures", help="rebuild every report figure and result table from collected sweeps")
    p.add_argument("--runs", default="runs", help="folder of collected sweeps (runs/NAME/results.csv)")
    p.add_argument("--out", default=None, help="folder for the figures and tables (default: figures/ and "
                                               "papers/results/, the committed results)")
    p.add_argument("--force", action="store_true", help="overwrite figures / tables made from more samples than "
                                                        "the runs found now")
    p.set_defaults(fn=cmd_figures)

    return ap


def _cluster_args(p) -> None:
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run each grid point as a task on a Dask cluster: a scheduler address (tcp://host:8786; "
                        "workers must share the output folder and the project's environment) or local:N "
                        "(a LocalCluster of N worker processes here); without it, the local pool (-j)")
    p.add_argument("--threads-per-run", type=int, default=None,
                   help="with --cluster: intra-op threads per run (default: each host's cores over its worker "
                        "threads)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # MethodError is a ValueError: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
