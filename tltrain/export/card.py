"""The model card (README.md of a package): intended use, data, test set, how the checkpoint was chosen, metrics
with 95 % intervals, what referable means, and how to load the package (tltrain or plain timm).

Which metric rows it shows is the rule of the run's own metrics (tltrain.metrics.run_metrics), not a restatement.
"""
from __future__ import annotations

import re
from pathlib import Path

from tltrain import safe_io
from tltrain.export.package_format import TIMM_CONFIG, WEIGHTS
from tltrain.metrics import run_metrics

#: The card's metric rows, in order: (label, metric name); a row is shown when the package's runs report it.
METRIC_ROWS = (("quadratic kappa", "kappa"), ("macro one-vs-rest AUC", "auc"),
               ("referable sensitivity", "sensitivity"), ("referable specificity", "specificity"),
               ("referable AUC", "referable_auc"), ("accuracy", "accuracy"), ("top-2 accuracy", "top2_accuracy"),
               ("cross-entropy", "cross_entropy"))


def _ci_text(ci: dict, name: str, fallback) -> str:
    entry = ci.get(name)
    if entry:
        return f"{entry['value']:.3f} ({entry['low']:.3f} to {entry['high']:.3f})"
    if isinstance(fallback, bool) or not isinstance(fallback, (int, float)) or fallback != fallback:
        return "-"  # absent, NaN, or not a number (metrics.json is a file someone may have edited)
    return f"{fallback:.3f}"


#: Hugging Face licence ids (https://hf.co/docs/hub/repositories-licenses) a package's licence is matched against
#: (case-insensitively); any other text is published as `license: other` with `license_name`.
HUB_LICENSES = ("apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0",
                "cc-by-nc-nd-4.0", "cc0-1.0", "openrail", "gpl-3.0", "lgpl-3.0", "other")
#: metric name -> (Hugging Face metric id, label) for the model-index of the front matter.
HUB_METRICS = {"kappa": ("cohen_kappa", "quadratic kappa"), "auc": ("roc_auc", "macro one-vs-rest AUC"),
               "referable_auc": ("roc_auc", "referable AUC"), "sensitivity": ("recall", "referable sensitivity"),
               "specificity": ("specificity", "referable specificity"), "accuracy": ("accuracy", "accuracy")}


def hub_results(dataset: str, split: str, metrics: dict, ci: dict) -> dict:
    """One model-index result: the metrics of one dataset split, each with its 95 % interval in its name (the
    Hub's metric entry has one value; the interval bounds go in `args`, which the Hub keeps as they are)."""
    entries = []
    for key, (metric_id, label) in HUB_METRICS.items():
        value = (ci.get(key) or {}).get("value", metrics.get(key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            continue
        entry = {"type": metric_id, "name": label, "value": round(float(value), 4)}
        if ci.get(key):
            low, high = ci[key]["low"], ci[key]["high"]
            entry["name"] = f"{label} (95 % CI {low:.3f} to {high:.3f})"
            entry["args"] = {"ci_low": round(float(low), 4), "ci_high": round(float(high), 4), "confidence": 0.95}
        entries.append(entry)
    return {"task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": f"{dataset} ({split})", "type": dataset, "split": split}, "metrics": entries}


def front_matter(meta: dict, results: list[dict] | None = None, datasets: list[str] | None = None,
                 tags: tuple[str, ...] = ()) -> str:
    """The card's YAML header, the metadata a Hugging Face model repository is indexed by: licence, library
    (timm loads the repository), tags, datasets and the test results with their intervals (model-index)."""
    import yaml

    license_text = str(meta.get("license") or "other")
    data = {"library_name": "timm", "pipeline_tag": "image-classification",
            "tags": ["image-classification", "timm", "tltrain", "fundus", "transfer-learning", *tags]}
    if license_text.lower() in HUB_LICENSES:
        data["license"] = license_text.lower()
    else:
        data.update(license="other", license_name=re.sub(r"[^a-z0-9.-]+", "-", license_text.lower())[:64] or "other")
    if meta.get("referable_threshold") is not None:
        data["tags"].append("diabetic-retinopathy")
    data["datasets"] = sorted({str(d) for d in (datasets or [meta["training_data"].get("name")]) if d})
    if results is None:
        test = meta["metrics"].get("test") or {}
        test_set = meta["metrics"].get("test_set") or {}
        results = [hub_results(str(meta["training_data"].get("name")), test_set.get("split", "test"), test,
                               meta["metrics"].get("test_ci") or {})] if test else []
    data["metrics"] = sorted({m["type"] for r in results for m in r["metrics"]})
    if results:
        data["model-index"] = [{"name": f"{meta['architecture']}-{meta['training_data'].get('name')}",
                                "results": results}]
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def model_card(meta: dict, out_dir: Path, header: str | None = None, sections: str = "") -> str:
    """The card's Markdown for a package's metadata; out_dir is the name it shows (the folder, not a local path).
    header: the YAML front matter (default: front_matter(meta)); sections: Markdown put before "Preprocessing"
    (the pipeline's per-source results and transfer finding)."""
    data, pre, checkpoint = meta["training_data"], meta["preprocessing"], meta["checkpoint"]
    metrics = meta["metrics"]
    test, val = metrics["test"], metrics["validation"]
    ci, test_set = metrics.get("test_ci") or {}, metrics.get("test_set")
    referable = meta.get("referable_threshold")
    names = [safe_io.markdown_text(n, 200) for n in (meta["class_names"] or meta["classes"])]  # from the manifest
    value = checkpoint.get("value")
    chosen = (f"checkpoint `{checkpoint['name']}` (optimizer step {checkpoint['step']}, after epoch "
              f"{checkpoint['epoch']}), the {checkpoint['chosen_by']}"
              + (f" ({checkpoint['metric']} {value:.4f})" if isinstance(value, (int, float)) else "") + ".")
    reported = run_metrics(meta["num_classes"], referable)  # referable: already the run's rule's answer
    rows = [(label, key) for label, key in METRIC_ROWS if key in reported]
    table = "\n".join(f"| {label} | {_ci_text(ci, key, test.get(key)) if test else '-'} | "
                      f"{_ci_text({}, key, val.get(key))} |" for label, key in rows)
    if test_set:
        counts = ", ".join(f"{name}: {count}" for name, count in zip(names, test_set["class_counts"]))
        test_text = f"test split `{test_set['split']}`: {test_set['count']} images ({counts})."
    elif test:
        test_text = f"test split: {test.get('count')} images (no per-image predictions, so no intervals)."
    elif not ((meta.get("config") or {}).get("data") or {}).get("test_split", "test"):
        test_text = ("no test metrics: the run had no test split (data.test_split was empty); run "
                     "`tltrain evaluate` on this package with a test set for them.")
    else:
        test_text = ("no test metrics of this checkpoint: the run tested another one "
                     "(run `tltrain evaluate` on this package for its own).")
    ci_text = (f"Intervals: 95 % {ci['method']}; {ci['resamples']} resamples, seed {ci['seed']}." if ci else
               "No intervals (no per-image test predictions of this checkpoint).")
    referable_text = (f"Referable DR means grade >= {referable} ({', '.join(names[referable:])}): moderate "
                      f"non-proliferative DR or worse, the usual threshold for referral to an ophthalmologist. "
                      f"Sensitivity and specificity count the predicted grade (argmax) against that threshold; "
                      f"referable AUC ranks images by P(grade >= {referable})." if referable is not None else
                      "Referable-DR metrics do not apply: the label set is not the 5-grade DR scale.")
    data = {**data, "name": safe_io.markdown_text(data["name"], 200)}
    layercam = meta.get("layercam") or {}
    maps_text = (f"## What it looks at\nLayerCAM maps of the true class on {len(layercam.get('images') or [])} test "
                 "images (a few per class; fused over every stage: red is where the class evidence lies). Draw them "
                 f"for your own images with `tltrain explain`.\n\n![LayerCAM maps]({layercam['file']})\n"
                 if layercam.get("file") else "")
    digests = data["manifest_sha256"] if isinstance(data["manifest_sha256"], list) else [data["manifest_sha256"]]
    data["manifest_sha256"] = "`, `".join(map(str, digests))
    per_source = (test or {}).get("per_source") or {}
    if per_source:  # a test split of several sources: each one's figures beside the pooled ones
        test_text += "\n- per source (test): " + "; ".join(
            f"{safe_io.markdown_text(name, 60)}: {part.get('count')} images, accuracy {part.get('accuracy', 0):.4f}"
            + (f", kappa {part['kappa']:.4f}" if isinstance(part.get("kappa"), float) else "")
            for name, part in per_source.items())
    header = front_matter(meta) if header is None else header
    return header + f"""
# {meta['architecture']} pretrained on {data['name']} (tltrain)

{meta['description'] or 'An intermediate-domain checkpoint for transfer learning on fundus photographs.'}

## Intended use
Initialisation for fine-tuning on retinal (fundus) tasks or as the intermediate step of two-step transfer
(ImageNet -> fundus -> target). Not a medical device; not validated for clinical decisions.

## Data
- training data: {data['name']} ({data['fraction'] * 100:g} % of the training split), manifest sha256
  `{data['manifest_sha256']}`
- classes ({meta['num_classes']}): {', '.join(names)}
- class counts in training: {data['class_counts']}
- {test_text}

## Checkpoint
{chosen}

## Metrics
| metric | test (95 % CI) | validation |
|---|---|---|
{table}

{ci_text}
{referable_text}

{maps_text}
{sections}
## Preprocessing (applied by `tltrain.load_pretrained` and `tltrain predict`)
Ben Graham: disc crop resized to {pre['size']} px (radius {pre['size'] // 2}), out = {pre['gain']:g}*img -
{pre['gain']:g}*gauss(sigma = radius * {pre['sigma_ratio']:.4f}) + {pre['offset']:g}, outside {pre['mask_ratio']:g} *
radius set to {pre['offset']:g}; normalise with mean {pre['mean']} and std {pre['std']}. Recipe enabled:
{pre['enabled']}.

## How to load
```python
import tltrain
model, preprocess = tltrain.load_pretrained("{out_dir}")   # checks the sha256
x = preprocess(pil_image)[None]                             # (1, 3, {pre['size']}, {pre['size']})
probabilities = model(x).softmax(-1)
```
Plain timm (reads `{TIMM_CONFIG}` and `{WEIGHTS}`; timm's own transforms resize and normalise but do not apply
the Ben Graham filter, whose parameters are in `{TIMM_CONFIG}` under `tltrain_preprocessing`):
```python
import timm
model = timm.create_model("local-dir:{out_dir}", pretrained=True)
# after an upload to the Hugging Face Hub (e.g. `huggingface-cli upload <user>/{out_dir.name} {out_dir}`):
model = timm.create_model("hf-hub:<user>/{out_dir.name}", pretrained=True)
```
Weights: `{WEIGHTS}`, sha256 `{meta['weights']['sha256']}`. Licence: {meta['license']}.
Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.
"""
