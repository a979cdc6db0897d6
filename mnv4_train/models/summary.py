"""Size and cost of the MNv4 family: per-stage parameters, MACs and activation bytes.

    python -m mnv4_train.models.summary --model conv_l [--resolution 384]
    python -m mnv4_train.models.summary --all

MACs count convolutions, dense layers and the attention matmuls (see `profile.py`); activation
bytes are what each MAC layer reads and writes at batch 1 in float32.
"""

from __future__ import annotations

import sys

from mnv4_train.cli import quiet_tensorflow
from mnv4_train.errors import ArgumentParser, exit_on_user_error, run_then_exit
from mnv4_train.models import specs  # the builder and profile (Keras) load on use

STAGES = ("stem", "stage0", "stage1", "stage2", "stage3", "stage4", "head")


def model_figures(name: str, resolution: int | None = None, num_classes: int = 1000) -> dict:
  """Parameters, MACs and activation bytes of one variant; also the per-stage breakdown."""
  from mnv4_train.models import builder, profile  # pylint: disable=import-outside-toplevel
  spec = specs.get_spec(name)
  resolution = resolution or spec.resolution
  model = builder.build(name, num_classes=num_classes)
  costs = profile.layer_costs(model, resolution)
  per_stage = {s: {"macs": 0, "act_bytes": 0, "blocks": 0} for s in STAGES}
  for c in costs:
    per_stage[c.stage]["macs"] += c.macs
    per_stage[c.stage]["act_bytes"] += c.activation_bytes()
  for s, (total, trainable) in profile.stage_params(model).items():
    per_stage[s].update(params=total, trainable=trainable)
  for i, stage in enumerate(spec.stages):
    per_stage[f"stage{i}"]["blocks"] = len(stage)
  return {
      "name": name,
      "paper_name": spec.paper_name,
      "resolution": resolution,
      "params": model.count_params(),
      "trainable": sum(per_stage[s].get("trainable", 0) for s in STAGES),
      "macs": sum(c.macs for c in costs),
      "attention_macs": sum(c.macs for c in costs if c.kind == "attention"),
      "act_bytes": sum(c.activation_bytes() for c in costs),
      "paper_top1": spec.paper_top1,
      "stages": per_stage,
  }


def format_model(fig: dict) -> str:
  lines = [f"{fig['paper_name']} ({fig['name']}) at {fig['resolution']}px, 1000 classes",
           f"{'stage':<8}{'blocks':>7}{'params':>13}{'trainable':>13}{'MMACs':>11}{'act MB':>9}"]
  for s in STAGES:
    st = fig["stages"][s]
    lines.append(f"{s:<8}{st['blocks'] or '':>7}{st.get('params', 0):>13,}"
                 f"{st.get('trainable', 0):>13,}{st['macs'] / 1e6:>11.1f}"
                 f"{st['act_bytes'] / 2**20:>9.1f}")
  lines.append(f"{'total':<8}{'':>7}{fig['params']:>13,}{fig['trainable']:>13,}"
               f"{fig['macs'] / 1e6:>11.1f}{fig['act_bytes'] / 2**20:>9.1f}")
  if fig["attention_macs"]:
    lines.append(f"(attention matmuls: {fig['attention_macs'] / 1e6:.1f} MMACs of the total)")
  return "\n".join(lines)


def format_family(figs: list[dict]) -> str:
  lines = ["MobileNetV4 family (1000 classes, canonical resolution)",
           f"{'model':<10}{'paper':<15}{'res':>5}{'params':>13}{'trainable':>13}"
           f"{'GMACs':>8}{'w/o attn':>10}{'act MB':>9}{'top-1':>7}"]
  for f in figs:
    lines.append(
        f"{f['name']:<10}{f['paper_name']:<15}{f['resolution']:>5}{f['params']:>13,}"
        f"{f['trainable']:>13,}{f['macs'] / 1e9:>8.3f}"
        f"{(f['macs'] - f['attention_macs']) / 1e9:>10.3f}{f['act_bytes'] / 2**20:>9.1f}"
        f"{f['paper_top1']:>7.1f}")
  lines.append("params include BatchNorm statistics; top-1 is the paper's ImageNet figure.")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  quiet_tensorflow(False)  # before the model builder loads TensorFlow
  parser = ArgumentParser(prog="mnv4_train.models.summary", description=__doc__.split("\n")[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--model", choices=specs.MODEL_NAMES, help="one variant, per stage")
  group.add_argument("--all", action="store_true", help="the family table")
  parser.add_argument("--resolution", type=int, default=None,
                      help="input size (default: the variant's canonical resolution)")
  args = parser.parse_args(argv)
  with exit_on_user_error(parser.prog):
    if args.resolution is not None and args.resolution < 32:
      parser.error(f"--resolution must be at least 32, got {args.resolution}")
    if args.all:
      print(format_family([model_figures(n, args.resolution) for n in specs.MODEL_NAMES]))
    else:
      print(format_model(model_figures(args.model, args.resolution)))
  return 0


if __name__ == "__main__":
  run_then_exit(main)
