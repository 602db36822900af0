"""The card's Markdown half, section by section, in the order of Intel's Prune OFA cards: what the
model is, how to load it, the method and recipe, sparsity, data, results, inference, limitations."""
from __future__ import annotations

from typing import Any, Optional

from orchestrator.model_card.exports import ExportRef
from orchestrator.model_card.records import RunRecords
from orchestrator.stages.results_table import results_table, seed_table
from pipelines.finetune.tasks import get_task

PAPER = "Zafrir et al., *Prune Once for All: Sparse Pre-Trained Language Models*, arXiv:2111.05754 (2021)"
_AUTO = {"pretraining": "AutoModelForPreTraining", "classification": "AutoModelForSequenceClassification",
         "qa": "AutoModelForQuestionAnswering"}
_MB = 1e6


def _f(v: Any, fmt: str = "{:.4f}") -> str:
    return "–" if v is None else fmt.format(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _kind(export: ExportRef) -> str:
    return "pretraining" if export.kind == "pretraining" else get_task(export.task or "").kind


def summary(records: RunRecords, export: ExportRef, sparsity: Optional[dict[str, Any]]) -> list[str]:
    r = records.recipe
    base = r.model.name if r.model and r.model.name else "a BERT initialised from scratch (`model.init`)"
    pct = f"{100 * sparsity['global_sparsity']:.1f}%" if sparsity else None
    if export.name == "teacher":
        what = (f"The dense teacher of pofa run `{r.name}`: {base}, with its MLM + NSP pretraining continued on "
                "the pruning corpus so that it is optimal on exactly that data (Prune OFA step 1).")
    elif export.name == "student":
        what = (f"A {pct or 'sparse'} sparse pre-trained BERT-family model made with Prune Once for All ({PAPER}): "
                f"the prepared teacher ({base}) pruned by gradual magnitude pruning while distilling from it. "
                "Fine-tune it on a downstream task with its zero pattern locked, as the results below were.")
    elif export.sparse:
        ft = r.finetune
        start = f"The sparse model `{ft.model}`" if ft and ft.model else "The sparse student"
        kd = ", distilling from a dense task teacher" if ft and ft.distill else ""
        what = (f"{start} fine-tuned on `{export.task}` by pofa run `{r.name}` (seed {export.seed}) with its zero "
                f"pattern locked{kd} (Prune OFA step 3){'; global sparsity ' + pct if pct else ''}.")
    else:
        what = (f"The dense task teacher of pofa run `{r.name}` for `{export.task}`: the prepared teacher fine-tuned "
                "on the task; the sparse models of the task distil from it.")
    out = [f"# {r.name}-{export.name.replace('/', '-')}", "", what, ""]
    return out + ([f"Recipe: {r.description}", ""] if r.description else [])


def how_to_load(export: ExportRef, load_id: str) -> list[str]:
    auto = _AUTO[_kind(export)]
    return ["## How to use", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
            f"tokenizer = AutoTokenizer.from_pretrained({load_id!r})",
            f"model = {auto}.from_pretrained({load_id!r})", "```", ""] + ([
            "The pruned weights are stored as exact zeros in a dense tensor: the model runs anywhere "
            "`transformers` does; speed and size gains need a sparse runtime or a compressed encoding.", ""]
        if export.sparse else [])


def method(records: RunRecords, export: ExportRef) -> list[str]:
    r = records.recipe
    lines = ["## Method and recipe", "",
             f"Built by pofa from recipe `{r.name}` (seed {r.seed}); "
             f"rerun it with `pofa run {r.name}`. The method follows Intel's reference implementation of Prune OFA "
             "(IntelLabs/Model-Compression-Research-Package).", ""]
    rows = []
    if r.teacher is not None:
        t = r.teacher
        rows.append(["teacher preparation (MLM + NSP)", f"{t.max_steps} steps, global batch {t.global_batch_size}, "
                     f"LR {t.learning_rate:g}, warm-up {t.warmup_ratio:g}, weight decay {t.weight_decay:g}"])
    if r.student is not None and (export.sparse or export.name == "student"):
        s, p, d = r.student, r.student.pruning, r.student.distillation
        sched = p.schedule
        rewind = f" with rewinding ({p.lr_rewind_window} window)" if p.lr_rewind else ""
        rows.append(["student pruning",
                     f"{s.max_steps} steps, global batch {s.global_batch_size}, LR {s.learning_rate:g}{rewind}"])
        rows.append(["pruning schedule",
                     f"{sched.kind}, sparsity {sched.initial_sparsity:g} → {sched.final_sparsity:g} over steps "
                     f"{sched.policy_begin_step}–{sched.policy_end_step}, masks every {sched.pruning_frequency} steps "
                     f"from {sched.begin_pruning_step} to {sched.end_pruning_step}"])
        rows.append(["pattern", _pattern(p.mask)])
        rows.append(["distillation",
                     f"{d.hard_weight:g} × hard loss + {d.kd_weight:g} × KD, temperature {d.temperature:g}"])
    if export.kind == "finetuned" and r.finetune is not None:
        ft = r.finetune
        task = next((t for t in ft.tasks if t.name == export.task), None)
        if task is not None:
            epochs = task.teacher_epochs if not export.sparse and task.teacher_epochs else task.epochs
            lr = task.teacher_learning_rate if not export.sparse and task.teacher_learning_rate else task.learning_rate
            rows.append([f"fine-tuning on {task.name}", f"{epochs:g} epochs, LR {lr:g}, global batch "
                         f"{task.global_batch_size}, max length {task.max_seq_length}"
                         + (", pattern locked" if export.sparse and ft.lock_pattern else "")
                         + (f", KD {ft.distillation.kd_weight:g} at T={ft.distillation.temperature:g}"
                            if export.sparse and ft.distill else "")])
    return lines + _table(["step", "settings"], rows) + [""]


def _pattern(mask: Any) -> str:
    if mask.kind == "block":
        return f"blocks of {mask.block_shape[0]}×{mask.block_shape[1]}, magnitude, uniform per layer"
    if mask.kind == "nm":
        return f"{mask.n}:{mask.m} semi-structured"
    return "unstructured magnitude, uniform sparsity per layer"


def sparsity_section(sparsity: Optional[dict[str, Any]]) -> list[str]:
    if not sparsity:
        return ["## Sparsity", "", "Dense: no weight was pruned.", ""]
    layers = sparsity["layers"]
    values = [entry["sparsity"] for entry in layers]
    pattern = sparsity.get("mask_kind") or "unstructured"
    if sparsity.get("block_shape"):
        pattern += " " + "×".join(map(str, sparsity["block_shape"]))
    if sparsity.get("nm"):
        pattern += " {}:{}".format(*sparsity["nm"])
    valid = sparsity.get("pattern_valid")
    out = ["## Sparsity", "",
           f"Global sparsity **{sparsity['global_sparsity']:.4f}** over {sparsity['prunable_numel']:,} prunable "
           f"weights in {len(layers)} layers (per layer {min(values):.4f}–{max(values):.4f}); pattern: {pattern}"
           f"{'' if valid is None else ', every layer valid' if valid else ', **not valid in every layer**'}. "
           "The pruned weights are the Linear weights listed below; embeddings, LayerNorms and biases stay dense. "
           "Per layer: `sparsity.json`.", "",
           "<details><summary>Sparsity per layer</summary>", ""]
    out += _table(["layer", "shape", "sparsity"],
                  [[e["name"], "×".join(map(str, e["shape"])), f"{e['sparsity']:.4f}"] for e in layers])
    return out + ["", "</details>", ""]


def data_section(records: RunRecords, export: ExportRef) -> list[str]:
    r, pre = records.recipe, records.preprocess
    out = ["## Training data and preprocessing", ""]
    if r.preprocess is not None:
        p, src = r.preprocess, r.preprocess.source
        where = src.name or src.path
        stats = records.manifests["preprocess"].stats if "preprocess" in records.manifests else {}
        val = p.validation_fraction
        out.append(f"Pretraining corpus: {src.kind} `{where}`"
                   + (f", {stats['documents_train']} training and {stats['documents_validation']} validation documents"
                      if "documents_train" in stats and "documents_validation" in stats else "") + ".")
        out.append(f"Split by document, deterministically: {100 * (1 - val):g}% train / {100 * val:g}% validation. "
                   f"Sentence-pair instances with next-sentence prediction (random next {p.nsp_random_prob:g}), "
                   f"maximum length {p.max_seq_length} tokens, a shorter target length with probability "
                   f"{p.short_seq_prob:g}.")
        if pre is not None:
            m = pre.masking
            out.append(f"Masking: {m.kind}, {100 * m.masked_lm_prob:g}% of tokens (at most {m.max_predictions_per_seq} "
                       f"per sequence), 80% [MASK] / 10% random / 10% unchanged; "
                       f"{pre.splits['train'].rows:,} training and {pre.splits['validation'].rows:,} validation "
                       f"instances; vocabulary {pre.vocab_size:,}.")
        out.append("")
    if export.task:
        ds_task = next((t for t in r.finetune.tasks if t.name == export.task), None) if r.finetune else None
        spec = get_task(export.task)
        source = "the task's hub dataset `" + "/".join(spec.hub) + "`" if spec.hub else "its labelled file"
        if ds_task is not None and ds_task.data.path:
            source = (f"`{ds_task.data.path}`, split {100 * (1 - ds_task.data.holdout_fraction):g}/"
                      f"{100 * ds_task.data.holdout_fraction:g} by seed {ds_task.data.split_seed}")
        elif ds_task is not None and ds_task.data.dataset:
            source = f"`{ds_task.data.dataset}`"
        out += [f"Fine-tuning data ({export.task}): {source}; evaluated on "
                + ", ".join(f"`{s}`" for s in spec.eval_splits.values()) + ".", ""]
    return out


def results_section(records: RunRecords, export: ExportRef) -> list[str]:
    from orchestrator.stages.finetune import task_results
    from pipelines.finetune.published import PUBLISHED, SOURCE

    out = ["## Results", ""]
    if records.training:
        out += ["Validation on the held-out pretraining documents (accuracy as a fraction):", ""]
        out += _table(["model", "MLM accuracy", "NSP accuracy", "loss", "sparsity", "steps"],
                      [[s, _f(t.metrics.get("val/mlm_acc")), _f(t.metrics.get("val/nsp_acc")),
                        _f(t.metrics.get("val/loss")), _f(t.sparsity), str(t.final_step)]
                       for s, t in records.training.items()])
        out.append("")
    if records.finetune is not None and records.finetune.tasks:
        results = {name: task_results(t) for name, t in records.finetune.tasks.items()}
        seeds = len(records.recipe.finetune.seeds) if records.recipe.finetune else 1
        published = PUBLISHED.get(records.recipe.name)
        out += ["Downstream, dev sets, percent: the sparse model fine-tuned with its pattern locked (mean of seeds) "
                "beside the dense task teacher:", "",
                results_table(results, records.recipe.name, published, seeds), ""]
        if published:
            out += [f"Published figures: {SOURCE}", ""]
        out += ["<details><summary>Every seed</summary>", "", seed_table(results), "", "</details>", ""]
    if len(out) == 2:
        out += ["No evaluation has finished for this run.", ""]
    return out


def inference_section(records: RunRecords, export: ExportRef) -> list[str]:
    row = records.inference_row(export.measured_as or export.name)
    if row is None:
        return []
    report = records.inference or {}
    ref = records.inference_row(row["reference"]) if row.get("reference") else None
    rows = [r for r in (row, ref) if r is not None]
    out = ["## Inference", "",
           f"Measured by the run's report on the CPU with {report.get('runtime')} {report.get('runtime_version') or ''}"
           f" (sequence length {report.get('seq_len')}; latency at batch {report.get('latency_batch')}, throughput "
           f"at batch {report.get('throughput_batch')}). \"× dense\": speed-up over the dense model of the same kind; "
           "compressed: the bitmask-and-values encoding of the weights (zlib).", ""]
    out += _table(["model", "sparsity", "throughput (seq/s)", "× dense", "latency (ms)", "× dense", "safetensors MB",
                   "compressed MB"],
                  [[r["name"], _f(r.get("sparsity"), "{:.3f}"), _f(r.get("throughput_seq_s"), "{:.1f}"),
                    _f(r.get("throughput_speedup"), "{:.2f}"), _f(r.get("latency_ms"), "{:.2f}"),
                    _f(r.get("latency_speedup"), "{:.2f}"),
                    _f(r.get("safetensors_bytes") and r["safetensors_bytes"] / _MB, "{:.2f}"),
                    _f(r.get("sparse_bytes") and r["sparse_bytes"] / _MB, "{:.2f}")] for r in rows])
    machine = report.get("machine") or {}
    return out + ["", f"Machine: {machine.get('cpu', 'unknown')}. {machine.get('explanation', '')}".rstrip(), ""]


def limitations(records: RunRecords, export: ExportRef) -> list[str]:
    out = ["## Limitations", "",
           "- Results hold for the data and settings above; a short run (a demo recipe, few steps) is far from the "
           "published numbers and says nothing about them.",
           "- Dense kernels do not run faster on zeros: the speed-ups need a runtime with sparse kernels.",
           "- The model inherits the biases of its base model and of Wikipedia-style English text; it was not "
           "evaluated for fairness or on other languages."]
    if export.sparse:
        out.append("- Keep the zero pattern locked when fine-tuning further (pofa's `finetune.lock_pattern`): "
                   "plain fine-tuning lets pruned weights grow back and the sparsity is lost.")
    return out + ["",
                  "## Citation", "", "```bibtex",
                  "@article{zafrir2021prune,", "  title={Prune Once for All: Sparse Pre-Trained Language Models},",
                  "  author={Zafrir, Ofir and Larey, Ariel and Boudoukh, Guy and Shen, Haihao and Wasserblat, Moshe},",
                  "  journal={arXiv preprint arXiv:2111.05754},", "  year={2021}", "}", "```", ""]


def card_body(records: RunRecords, export: ExportRef, sparsity: Optional[dict[str, Any]], load_id: str) -> str:
    parts = (summary(records, export, sparsity) + how_to_load(export, load_id) + method(records, export)
             + sparsity_section(sparsity) + data_section(records, export) + results_section(records, export)
             + inference_section(records, export) + limitations(records, export))
    return "\n".join(parts)
