"""Fidelity benchmark (`make bench-fidelity`): does Prune OFA's recipe beat the simpler alternatives?

A script, not a test. It drives pofa's real pipeline (`pofa run`, one subprocess per step, each
with the `tiny` recipe plus `--set` overrides) and reads every result through the stages' typed
output records (`workers.stage_outputs.read_output`, `orchestrator.stages.finetune.task_results`).

1. **Teacher** (run directory `<out>/base`, stages preprocess + teacher): a small BERT (default
   4 layers, hidden 256, 4 heads, intermediate 1024, sequence 64, a 4,000-word WordPiece vocabulary
   learned from the corpus) pretrained from scratch on the gensim Wikipedia fragment. Its validation
   MLM and NSP accuracy are printed beside two baselines computed from the same validation rows the
   stage evaluates: always predicting the most frequent target token (the expected accuracy under
   the preprocess masking contract: every non-special token of a row is equally likely to be one of
   its `min(cap, round(len * p))` targets), and always predicting the majority NSP class.
   "Clearly learned" = MLM accuracy >= 2x its baseline and NSP accuracy > 0.6.
2. **Students**: every variant starts from that teacher's export, with the same step budget
   (`student.max_steps`) and optimiser, for each seed in `--seeds` (`student.seed`; the preprocess
   and teacher stages are seeded by the recipe's `seed` and shared). Each variant x seed has its own
   run directory `<out>/<variant>-s<seed>`: the finished `preprocess/` and `teacher/` folders of
   `<out>/base` (their manifests included, without checkpoints) and its `recipe.yaml` are copied in,
   then `pofa run ... --stages student[,finetune]` runs there. The variants, as recipe keys:

   (a) method      cubic GMP + KD: `student.pruning.schedule.kind=cubic`, 0 -> 0.9 from step 0 to
                   `policy_end_step` = 50% of the steps, masks recomputed every 1% of the steps
                   until `end_pruning_step` = 80% (the reference's 50k / 80k / 1k of 100k steps),
                   `lr_rewind=true`, `distillation.hard_weight=0.5 kd_weight=0.5 temperature=2.0`
                   (MLM KL over every token, the reference's).
   (b) gmp-no-kd   as (a) but `distillation.hard_weight=1.0 kd_weight=0.0` (hard loss only).
   (c) oneshot-kd  `schedule.kind=one_shot begin_pruning_step=0 end_pruning_step=0`: 90% magnitude
                   pruning before the first update, masks fixed afterwards; KD as (a). (With the
                   pruning window empty, `lr_rewind` is plain linear decay.)
   (d) dense       the ceiling: `schedule.kind=constant final_sparsity=0.0` (no pruning; the dense
                   teacher's pattern, i.e. none, is kept) and `hard_weight=1.0 kd_weight=0.0`: the
                   dense teacher trained on for the same steps on the same loss it was trained with.

   Ablations of (a), one knob each, opt-in with `--variants` (no fine-tunes): (e) `lr_rewind=false`
   (linear decay from step 0), (f) `distillation.mlm_positions=masked` (the MLM KL on the masked
   positions only), (g) `distillation.temperature=1.0`.

3. **Downstream**: for the first seed of each variant, the finetune stage fine-tunes the student on
   Pang & Lee polarity (the `tiny` recipe's finetune section) with its zero pattern locked and KD
   from a dense task teacher, for `finetune.seeds` (3 seeds). The dense task teacher (fine-tuned
   from the pretraining teacher) is trained once, in the first variant's run directory, and handed to
   the others as `finetune.tasks.0.teacher`.

Output: the table on stdout (exit 0), `<out>/fidelity.md`, `<out>/fidelity.json`, and an MLflow
parent run with a nested run per variant in `sqlite:///<out>/mlflow.db` (artifacts in
`<out>/mlartifacts`). "mean ± spread" is the mean over seeds ± half their range (for two seeds:
both values lie on the interval's ends). The goal, (a) beats (b) and (c) on validation MLM
accuracy by more than the seed spread, is checked as `mean_a - spread_a > mean_x + spread_x`.

With `--jobs 2` (the default) the later seeds' students run in a second process beside the first
seed's runs. Rerunning the same command resumes: pofa skips every finished stage (`--fresh` starts over).
`--quick` (a 2-layer hidden-64 model, short runs, one fine-tune seed) checks the plumbing in
minutes; its teacher does not meet the "clearly learned" bar.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from orchestrator.stages.finetune import task_results  # noqa: E402
from workers.run_layout import RunLayout  # noqa: E402
from workers.stage_outputs import (FinetuneOutput, PreprocessOutput, TrainingOutput, load_manifest,  # noqa: E402
                                   read_output)
from workers.train.inputs import split_files  # noqa: E402

from tests.bench.fidelity_report import (VARIANTS, build_table, goal, log_mlflow, mean_spread, publish,  # noqa: E402
                                        timing_line)

FINETUNED = ("a", "b", "c", "d")  # the polarity column: the four comparisons the issue asks for
TASK = "polarity"

# Sizes. Default: meant for about 40 minutes on 2 quiet cores (README: the measured time). Quick: the plumbing.
DEFAULT = dict(hidden=256, layers=4, heads=4, intermediate=1024, seq=64, vocab=4000,
               teacher_steps=1200, teacher_lr=1.0e-3, student_steps=200, student_lr=5.0e-4,
               batch=32, micro=16, eval_batches=50, seeds=[1, 2], ft_seeds=[42, 43, 44], ft_epochs=8)
QUICK = dict(hidden=64, layers=2, heads=2, intermediate=128, seq=64, vocab=4000,
             teacher_steps=150, teacher_lr=2.0e-3, student_steps=40, student_lr=1.0e-3,
             batch=32, micro=16, eval_batches=20, seeds=[1, 2], ft_seeds=[42], ft_epochs=2)


# -- recipe overrides ------------------------------------------------------------------------------
def base_sets(s: dict[str, Any]) -> list[str]:
    """The recipe of every run directory: `tiny` with the bench's model and teacher."""
    return [
        "name=fidelity", "seed=42",
        f"preprocess.max_seq_length={s['seq']}", f"preprocess.tokenizer.train_vocab_size={s['vocab']}",
        f"model.init.hidden_size={s['hidden']}", f"model.init.num_hidden_layers={s['layers']}",
        f"model.init.num_attention_heads={s['heads']}", f"model.init.intermediate_size={s['intermediate']}",
        f"model.init.max_position_embeddings={s['seq']}",
        f"teacher.max_steps={s['teacher_steps']}", f"teacher.learning_rate={s['teacher_lr']}",
        "teacher.warmup_ratio=0.05", f"teacher.global_batch_size={s['batch']}",
        f"teacher.micro_batch_size={s['micro']}", f"teacher.eval_every={max(1, s['teacher_steps'] // 6)}",
        f"teacher.eval_batches={s['eval_batches']}", f"teacher.checkpoint_every={max(1, s['teacher_steps'] // 6)}",
        "teacher.keep_checkpoints=1",
        # the student's common keys; the variant adds pruning and distillation
        f"student.max_steps={s['student_steps']}", f"student.learning_rate={s['student_lr']}",
        "student.warmup_ratio=0.05", f"student.global_batch_size={s['batch']}",
        f"student.micro_batch_size={s['micro']}", f"student.eval_every={s['student_steps']}",
        f"student.eval_batches={s['eval_batches']}", f"student.checkpoint_every={max(1, s['student_steps'] // 3)}",
        "student.keep_checkpoints=1",
        f"finetune.seeds=[{','.join(str(x) for x in s['ft_seeds'])}]", f"finetune.tasks.0.epochs={s['ft_epochs']}",
        f"finetune.tasks.0.eval_every_epochs={s['ft_epochs']}",
    ]


def variant_sets(variant: str, s: dict[str, Any]) -> list[str]:
    steps = s["student_steps"]
    sched = "student.pruning.schedule."
    cubic = [f"{sched}kind=cubic", f"{sched}policy_begin_step=0", f"{sched}policy_end_step={steps // 2}",
             f"{sched}begin_pruning_step=0", f"{sched}end_pruning_step={steps * 4 // 5}",
             f"{sched}pruning_frequency={max(1, steps // 100)}", f"{sched}initial_sparsity=0.0",
             f"{sched}final_sparsity=0.9", "student.pruning.lr_rewind=true"]
    kd = ["student.distillation.hard_weight=0.5", "student.distillation.kd_weight=0.5",
          "student.distillation.temperature=2.0"]
    hard = ["student.distillation.hard_weight=1.0", "student.distillation.kd_weight=0.0"]
    if variant == "a":
        return cubic + kd
    if variant == "b":
        return cubic + hard
    if variant == "c":
        return [f"{sched}kind=one_shot", f"{sched}begin_pruning_step=0", f"{sched}end_pruning_step=0",
                f"{sched}initial_sparsity=0.0", f"{sched}final_sparsity=0.9", "student.pruning.lr_rewind=true"] + kd
    if variant == "e":
        return [x for x in cubic if not x.endswith("lr_rewind=true")] + ["student.pruning.lr_rewind=false"] + kd
    if variant == "f":
        return cubic + kd + ["student.distillation.mlm_positions=masked"]
    if variant == "g":
        return cubic + kd[:-1] + ["student.distillation.temperature=1.0"]
    if variant == "d":
        return [f"{sched}kind=constant", f"{sched}initial_sparsity=0.0", f"{sched}final_sparsity=0.0",
                "student.pruning.lr_rewind=false"] + hard
    raise ValueError(variant)


# -- running pofa ------------------------------------------------------------------------------------
def pofa(run_dir: Path, stages: str, sets: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--run-dir", str(run_dir), "--stages", stages]
    for kv in sets:
        cmd += ["--set", kv]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    print(f"  {run_dir.name}: {stages} {'done' if rc == 0 else f'FAILED (exit {rc})'} "
          f"in {time.time() - started:.0f} s (log {log})", flush=True)
    if rc != 0:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(f"bench-fidelity: pofa failed in {run_dir}:\n" + "\n".join(tail))


def seed_run_dir(base: Path, dst: Path) -> None:
    """A variant's run directory: the finished preprocess and teacher stages of `base`, manifests
    included (so pofa sees them as done and the student reads the teacher's export), no checkpoints."""
    if (dst / "teacher" / "manifest.json").exists():
        return
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / "recipe.yaml", dst / "recipe.yaml")
    skip = shutil.ignore_patterns("checkpoints", "ray", "corrupt-*")
    for stage in ("preprocess", "teacher"):
        shutil.copytree(base / stage, dst / stage, ignore=skip, dirs_exist_ok=True)


# -- baselines from the validation data ---------------------------------------------------------------
def baselines(base: Path, eval_rows: int) -> dict[str, Any]:
    """Accuracy of always predicting the most frequent MLM target, and the majority NSP class, on the
    validation rows the training stages evaluate (the first `eval_rows` in stored order)."""
    from transformers import AutoTokenizer

    layout = RunLayout.open(str(base))
    record = read_output(layout, "preprocess", PreprocessOutput)
    tok = AutoTokenizer.from_pretrained(layout.path(record.tokenizer))
    special = set(tok.all_special_ids)
    p, cap = record.masking.masked_lm_prob, record.masking.max_predictions_per_seq
    files, _ = split_files(layout, record, "validation")
    expected: Counter = Counter()
    targets = 0.0
    nsp: Counter = Counter()
    rows = 0
    for path in files:
        table = pq.read_table(path, columns=["input_ids", "next_sentence_label"]).to_pydict()
        for ids, label in zip(table["input_ids"], table["next_sentence_label"]):
            if rows >= eval_rows:
                break
            rows += 1
            nsp[int(label)] += 1
            cand = [t for t in ids if t not in special]
            n = min(cap, max(1, round(len(ids) * p)), len(cand))
            if not cand:
                continue
            w = n / len(cand)
            for t, c in Counter(cand).items():
                expected[t] += c * w
            targets += n
    top, top_count = expected.most_common(1)[0]
    return {"rows": rows, "mlm_targets": targets, "mlm_top_token": tok.convert_ids_to_tokens(int(top)),
            "mlm_acc": top_count / targets, "nsp_acc": max(nsp.values()) / rows,
            "nsp_random_fraction": nsp.get(1, 0) / rows}


# -- every model on the same validation masks ------------------------------------------------------------
def common_eval(base: Path, models: dict[str, str], eval_rows: int, seed: int = 42,
                micro: int = 32) -> dict[str, dict[str, float]]:
    """val/* of each exported model on the same validation rows with the same masks (those of `seed`,
    the teacher's), through the training stages' own validation batches and counts. The stages'
    own val/* use masks keyed by `student.seed`, so their seed spread mixes two mask draws into the
    training noise; this paired view takes the mask draw out."""
    import torch

    from pipelines.models.build import load_pretraining_model
    from pipelines.models.heads import accepted_inputs
    from pipelines.training.losses import metrics_from_counts, pretraining_counts
    from workers.train.inputs import PretrainingInputs

    torch.set_num_threads(2)
    inputs = PretrainingInputs(RunLayout.open(str(base)), seed, 0, 1, micro, micro, eval_rows)
    batches = [b for b, real in inputs.validation.batches() if real]
    out = {}
    for name, folder in models.items():
        model = load_pretraining_model(folder).eval()
        counts = torch.zeros(6, dtype=torch.float64)
        with torch.no_grad():
            for batch in batches:
                o = model(**accepted_inputs(model, batch, ("input_ids", "token_type_ids", "attention_mask")))
                counts += pretraining_counts(o, batch)
        out[name] = metrics_from_counts(counts)
    return out


# -- the students ------------------------------------------------------------------------------------------
def students_only(out: Path, base: Path, variants: list[str], seeds: list[int], common: list[str],
                  sets: dict[str, list[str]]) -> None:
    """The second process of `--jobs 2`: the later seeds' students (no fine-tunes); the first process reads them."""
    for seed in seeds:
        for v in variants:
            run_dir = out / f"{v}-s{seed}"
            seed_run_dir(base, run_dir)
            pofa(run_dir, "student", common + sets[v] + [f"student.seed={seed}"], out / "logs" / f"{run_dir.name}.log")


def helper_command(script: str, args: argparse.Namespace, out: Path, variants: list[str], settings: dict[str, Any],
                   extra: tuple[str, ...] = ()) -> Optional[list[str]]:
    """With `--jobs 2` and more than one seed, `script --students-only` for the later seeds: a pofa run spends
    part of its time starting, evaluating and exporting on one core, so two runs side by side keep both
    cores busier. None otherwise."""
    if args.jobs < 2 or len(settings["seeds"]) < 2:
        return None
    return [sys.executable, script, "--students-only", "--out", str(out), "--variants", ",".join(variants),
            "--seeds", ",".join(str(x) for x in settings["seeds"][1:]), f"--student-steps={settings['student_steps']}",
            f"--teacher-steps={settings['teacher_steps']}"] + (["--quick"] if args.quick else []) + list(extra)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options of both fidelity benches (this one and bench_fidelity_pretrained.py)."""
    ap.add_argument("--quick", action="store_true", help="small sizes and short runs: checks the plumbing")
    ap.add_argument("--out", default=None, help="output folder (default runs/<bench>[-quick])")
    ap.add_argument("--variants", default="a,b,c,d")
    ap.add_argument("--seeds", default=None, help="student seeds, comma-separated (default 1,2)")
    ap.add_argument("--student-steps", type=int, default=None)
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="delete the output folder first")
    ap.add_argument("--jobs", type=int, default=2,
                    help="2: the later seeds' students run in a second process beside the first seed's runs")
    ap.add_argument("--students-only", action="store_true", help=argparse.SUPPRESS)  # that second process


def resolve_settings(args: argparse.Namespace, bench: str, quick: dict[str, Any], default: dict[str, Any]
                     ) -> tuple[dict[str, Any], list[str], Path]:
    """The sizes (`quick` or `default`, with the command line's seeds and steps), the variants, and the output
    folder `runs/<bench>[-quick]` (made; emptied first with `--fresh`)."""
    settings = dict(quick if args.quick else default)
    if args.seeds:
        settings["seeds"] = [int(x) for x in args.seeds.split(",")]
    if args.student_steps:
        settings["student_steps"] = args.student_steps
    if args.teacher_steps:
        settings["teacher_steps"] = args.teacher_steps
    variants = [v for v in args.variants.split(",") if v]
    out = Path(args.out or REPO / "runs" / (f"{bench}-quick" if args.quick else bench)).resolve()
    if args.fresh and out.exists() and not args.students_only:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return settings, variants, out


def run_students(out: Path, base: Path, variants: list[str], seeds: list[int], common: list[str],
                 sets: dict[str, list[str]], *, finetuned: tuple[str, ...], labels: dict[str, str],
                 helper_cmd: Optional[list[str]] = None
                 ) -> tuple[dict[str, dict[str, list[float]]], dict[str, str], dict[str, float], Optional[list[float]]]:
    """Every variant x seed in its own run directory seeded from `base`, seed-major so that an interrupted
    run has every variant's first seed; the first seed of each variant in `finetuned` also fine-tunes (the
    dense task teacher is trained once, in the first such run, and handed to the others). `helper_cmd`
    (from `helper_command`) runs the later seeds in a second process beside the first seed's runs.
    Returns the results per variant (val MLM acc, MLM loss, NSP acc per seed, polarity per fine-tune
    seed), the exports (the teacher's included), the stage times and the task teacher's polarity."""
    results: dict[str, dict[str, list[float]]] = {v: {"mlm_acc": [], "mlm_loss": [], "nsp_acc": [], "polarity": []}
                                                  for v in variants}
    layout = RunLayout.open(str(base))
    exports: dict[str, str] = {"teacher": layout.path(read_output(layout, "teacher", TrainingOutput).model)}
    stage_times: dict[str, float] = {}
    task_teacher: Optional[str] = None
    task_teacher_acc: Optional[list[float]] = None
    helper = subprocess.Popen(helper_cmd, cwd=REPO) if helper_cmd else None
    for i, seed in enumerate(seeds):
        if i == 1 and helper is not None and helper.wait() != 0:
            raise SystemExit(f"bench-fidelity: the second process failed (exit {helper.returncode})")
        for v in variants:
            run_dir = out / f"{v}-s{seed}"
            seed_run_dir(base, run_dir)
            finetune = i == 0 and v in finetuned
            extra = [f"student.seed={seed}"]
            if finetune and task_teacher:
                extra.append(f"finetune.tasks.0.teacher={task_teacher}")
            pofa(run_dir, "student,finetune" if finetune else "student", common + sets[v] + extra,
                 out / "logs" / f"{run_dir.name}.log")
            rl = RunLayout.open(str(run_dir))
            m = read_output(rl, "student", TrainingOutput)
            results[v]["mlm_acc"].append(m.metrics["val/mlm_acc"])
            results[v]["mlm_loss"].append(m.metrics["val/mlm_loss"])
            results[v]["nsp_acc"].append(m.metrics["val/nsp_acc"])
            print(f"    {labels[v]}, seed {seed}: val MLM acc {m.metrics['val/mlm_acc']:.4f}, "
                  f"loss {m.metrics['val/mlm_loss']:.3f}, NSP acc {m.metrics['val/nsp_acc']:.4f}, "
                  f"sparsity {m.sparsity}", flush=True)
            stage_times[f"{run_dir.name}/student"] = load_manifest(rl, "student").wall_time_s
            exports[f"{v}-s{seed}"] = rl.path(m.model)
            if finetune:
                ft = read_output(rl, "finetune", FinetuneOutput).tasks[TASK]
                summary = task_results(ft)
                # the finetune stage reports accuracy in percent
                results[v]["polarity"] = [float(ms["accuracy"]) / 100 for ms in summary["seeds"].values()]
                stage_times[f"{run_dir.name}/finetune"] = load_manifest(rl, "finetune").wall_time_s
                if task_teacher is None and ft.teacher is not None:
                    task_teacher = rl.path(ft.teacher.model)
                    task_teacher_acc = [float(ft.teacher.metrics["accuracy"]) / 100]
    return results, exports, stage_times, task_teacher_acc


# -- main --------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--no-common-eval", action="store_true", help="skip the paired re-evaluation")
    args = ap.parse_args()
    settings, variants, out = resolve_settings(args, "bench-fidelity", QUICK, DEFAULT)
    started = time.time()
    common = base_sets(settings)
    print(f"bench-fidelity: {'quick' if args.quick else 'default'} settings {json.dumps(settings)}", flush=True)
    print(f"bench-fidelity: output {out}", flush=True)

    # 1. the teacher
    base = out / "base"
    # (the student keys of the recipe must be valid for its step budget: those of variant (a); the
    # preprocess and teacher stages do not depend on them)
    pofa(base, "preprocess,teacher", common + variant_sets("a", settings), out / "logs" / "base.log")
    layout = RunLayout.open(str(base))
    teacher = read_output(layout, "teacher", TrainingOutput).metrics
    base_acc = baselines(base, settings["eval_batches"] * settings["batch"])

    # 2. + 3. the students
    sets = {v: variant_sets(v, settings) for v in variants}
    if args.students_only:  # the second process: its students are read by the first one
        students_only(out, base, variants, settings["seeds"], common, sets)
        return 0
    helper = helper_command(__file__, args, out, variants, settings)
    results, exports, stage_times, task_teacher_acc = run_students(
        out, base, variants, settings["seeds"], common, sets, finetuned=() if args.no_finetune else FINETUNED,
        labels=VARIANTS, helper_cmd=helper)
    paired: dict[str, dict[str, float]] = {}
    if not args.no_common_eval:
        print("bench-fidelity: every export on the same validation masks ...", flush=True)
        paired = common_eval(base, exports, settings["eval_batches"] * settings["batch"])
    for stage in ("preprocess", "teacher"):
        stage_times[f"base/{stage}"] = load_manifest(layout, stage).wall_time_s
    wall = time.time() - started

    # the report
    ok_t_mlm = teacher["val/mlm_acc"] >= 2 * base_acc["mlm_acc"]
    ok_t_nsp = teacher["val/nsp_acc"] > 0.6
    lines = [
        f"Settings: {'--quick' if args.quick else 'default'}; BERT {settings['layers']} layers, hidden "
        f"{settings['hidden']}, {settings['heads']} heads, intermediate {settings['intermediate']}, sequence "
        f"{settings['seq']}, WordPiece vocabulary {settings['vocab']} learned from the corpus; batch "
        f"{settings['batch']}; teacher {settings['teacher_steps']} steps (LR {settings['teacher_lr']}); every student "
        f"{settings['student_steps']} steps (LR {settings['student_lr']}), seeds {settings['seeds']}; polarity "
        f"fine-tune seeds {settings['ft_seeds']} ({settings['ft_epochs']} epochs) on the first student seed.",
        "",
        "| teacher (validation, "
        f"{base_acc['rows']} rows) | teacher | baseline | ratio | bar |",
        "|---|---|---|---|---|",
        f"| MLM accuracy | {100 * teacher['val/mlm_acc']:.2f}% | {100 * base_acc['mlm_acc']:.2f}% (always "
        f"`{base_acc['mlm_top_token']}`) | {teacher['val/mlm_acc'] / base_acc['mlm_acc']:.2f}× | ≥ 2×: "
        f"{'met' if ok_t_mlm else 'NOT met'} |",
        f"| NSP accuracy | {100 * teacher['val/nsp_acc']:.2f}% | {100 * base_acc['nsp_acc']:.2f}% (majority class)"
        f" | {teacher['val/nsp_acc'] / base_acc['nsp_acc']:.2f}× | > 60%: {'met' if ok_t_nsp else 'NOT met'}; above "
        f"the majority class: {'yes' if teacher['val/nsp_acc'] > base_acc['nsp_acc'] else 'NO'} |",
        f"| MLM loss | {teacher['val/mlm_loss']:.3f} | | | |",
        "",
    ]
    lines += build_table(results)
    if task_teacher_acc:
        lines.append(f"\nDense task teacher (fine-tuned from the pretraining teacher, seed 42): polarity accuracy "
                     f"{100 * task_teacher_acc[0]:.2f}%.")
    if paired:
        lines += ["", "The same exports re-scored by the bench on the teacher's validation masks (seed 42), val MLM "
                  "accuracy %: a check on the stages' own figures above, which use the same masks for every run "
                  "(`VALIDATION_SEED`); runs made before that change differ here:", "",
                  "| model | " + " | ".join(f"seed {x}" for x in settings["seeds"]) + " | mean ± spread |",
                  "|---|" + "---|" * (len(settings["seeds"]) + 1)]
        lines.append(f"| dense teacher | {100 * paired['teacher']['val/mlm_acc']:.2f} |"
                     + " |" * len(settings["seeds"]))
        for v in variants:
            xs = [paired[f"{v}-s{x}"]["val/mlm_acc"] for x in settings["seeds"] if f"{v}-s{x}" in paired]
            m, sp = mean_spread(xs)
            lines.append(f"| {VARIANTS[v]} | " + " | ".join(f"{100 * x:.2f}" for x in xs)
                         + f" | {100 * m:.2f} ± {100 * sp:.2f} |")
    ok, verdicts = goal(results)
    lines += ["", "Goal — (a) beats (b) and (c) on validation MLM accuracy by more than the seed spread: "
              + ("**met**" if ok else "**not met**" if ok is False else "not measured")]
    lines += [f"- {v}" for v in verdicts]
    if paired and len(settings["seeds"]) > 1 and all(f"{v}-s{x}" in paired for v in "abc" for x in settings["seeds"]):
        as_results = {v: {"mlm_acc": [paired[f"{v}-s{x}"]["val/mlm_acc"] for x in settings["seeds"]]} for v in "abc"}
        ok_paired, verdicts_paired = goal(as_results)
        lines += ["", "The same check on one set of validation masks (paired): "
                  + ("**met**" if ok_paired else "**not met**")]
        lines += [f"- {v}" for v in verdicts_paired]
    lines += ["", timing_line(wall, stage_times)]
    publish(out, "fidelity", lines, {
        "settings": settings, "teacher": teacher, "baselines": base_acc, "results": results,
        "task_teacher_polarity": task_teacher_acc, "goal_met": ok, "common_masks": paired, "verdicts": verdicts,
        "variant_overrides": sets, "common_overrides": common, "stage_times_s": stage_times, "wall_s": wall},
        lambda md: log_mlflow(out, settings, teacher, base_acc, results, sets, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
