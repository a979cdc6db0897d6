"""Import timm's MobileNetV4 weights (safetensors) into our Keras model, to start from a
pretrained network; or timm's TF-ported EfficientNets, as teachers.

    python -m mnv4_train.convert --from_timm model.safetensors --model conv_m --out conv_m.keras

(`--model efficientnet_b0` ... `efficientnet_l2` takes timm's `tf_efficientnet_*` weights, the
paper's teacher included: see mnv4_train/convert_efficientnet.py. What follows is MobileNetV4.)

Takes the `model.safetensors` file timm publishes for `mobilenetv4_conv_small|medium|large` and
`mobilenetv4_hybrid_medium|large` (any head size, any channel multiplier) and writes a `.keras`
file of our model carrying the same weights and the source's settings, so that its logits equal
timm's (eval mode, same NHWC input; tests/test_convert.py holds the parity to 1e-4):

- timm's conventions, not the Model Garden's: BatchNorm epsilon 1e-5 and momentum 0.9 (PyTorch's
  0.1), convolutions padded k//2 on every side (`padding="symmetric"`); Hybrid-L's exact GELU
  throughout comes with the variant.
- inputs: timm's MNv4 weights were trained on ImageNet-normalised images ((pixel / 255 - mean) /
  std). By default (`--input project`) the model takes the project's [-1, 1] images and a fixed
  first layer `input_norm` maps them onto timm's normalisation exactly, so it drops into our
  training and export unchanged; `--input timm` leaves that layer out (the model then takes
  timm-normalised images, as timm's does).
- every layer's channel count is read from the file, not recomputed from a width multiplier
  (timm keeps the stem at full width under a multiplier; our `width` rounding would not).
- which variant the file holds is read from its block layout (kinds, kernel sizes, attention
  heads), so a file of another variant, or not of MobileNetV4 at all, is refused in one line.
- timm's anti-aliased variants (`mobilenetv4_conv_aa_*`, `mobilenetv4_conv_blur_*`) blur-pool
  their strided convs, which our model does not; their weights are indistinguishable from the
  plain ones, so the `config.json` timm publishes beside `model.safetensors` is read when present:
  its architecture must be a plain `mobilenetv4_*` of the variant, and its `pretrained_cfg`
  mean/std (if any) set the input normalisation.

Runs on NumPy and safetensors only; nothing is downloaded. Where this sits: outside the training
flow, a way in for pretrained weights; the `.keras` it writes is what `mnv4_train.export` and the
trainer load. Layout of timm's state dict (timm 1.0): `conv_stem`/`bn1`, `blocks.{stage}.{i}`
(stages 0-3 are the paper's tables, stage 4 the 1x1 conv to 960), `conv_head`/`norm_head`,
`classifier`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile

from mnv4_train import ownership
from mnv4_train.cli import quiet_tensorflow
from mnv4_train.errors import (ArgumentParser, ConfigError, InputPathError, exit_on_user_error,
                               run_then_exit)
from mnv4_train.models import specs as S
# The pieces both converters use (convert_efficientnet too), also named here as before.
from mnv4_train.timm_weights import (  # noqa: F401
    IMAGENET_MEAN, IMAGENET_STD, INPUTS, TIMM_NAMES, TimmWeights, assign, identify_timm, load_bn,
    load_conv, read_safetensors, read_timm_config)

# The source's settings (timm builds every MNv4 with PyTorch BatchNorm defaults and k//2 padding).
TIMM_SETTINGS = dict(padding="symmetric", bn_epsilon=1e-5, bn_momentum=0.9)


def _out_channels(weights: TimmWeights, spec) -> dict[str, int]:
  """Our `filters` overrides: every layer's output channels as the file has them."""
  filters = {"stem": weights.shape("conv_stem.weight")[0],
             "stage4_conv": weights.shape("blocks.4.0.conv.weight")[0],
             "head_conv": weights.shape("conv_head.weight")[0]}
  for s, stage in enumerate(spec.stages):
    for i, block in enumerate(stage):
      keys = weights.blocks[s][i]
      for key in ("pw_proj.conv.weight", "conv_pwl.weight", "conv.weight"):
        if key in keys:
          filters[f"stage{s}_block{i}"] = weights.shape(f"blocks.{s}.{i}.{key}")[0]
          break
  return filters


def _ops(block) -> dict:
  return {op.name: op for op in block.ops_}


def _load_mqa(block, weights: TimmWeights, prefix: str) -> None:
  load_bn(block.norm, weights, f"{prefix}.norm")
  load_conv(block.query[-1], weights, f"{prefix}.attn.query.proj.weight")
  for branch, ops in (("key", block.key), ("value", block.value)):
    named = {op.name: op for op in ops}
    if f"{branch}_dw" in named:
      load_conv(named[f"{branch}_dw"], weights, f"{prefix}.attn.{branch}.down_conv.weight")
      load_bn(named[f"{branch}_dw_bn"], weights, f"{prefix}.attn.{branch}.norm")
    load_conv(named[f"{branch}_proj"], weights, f"{prefix}.attn.{branch}.proj.weight")
  load_conv(block.output_proj, weights, f"{prefix}.attn.output.proj.weight")
  if block.layer_scale is not None:
    assign(block.layer_scale.gamma, weights.take(f"{prefix}.layer_scale.gamma"),
            f"{prefix}.layer_scale.gamma", weights.source)


def _chain_loader(pairs):
  """Loads a block whose sublayers are one chain (`ops_`): (our conv, timm conv key, our BN,
  timm BN prefix) per conv the block may hold, then its layer scale if any."""
  def load(block, weights: TimmWeights, prefix: str) -> None:
    ops = _ops(block)
    for conv, conv_key, bn, bn_key in pairs:
      if conv in ops:
        load_conv(ops[conv], weights, f"{prefix}.{conv_key}")
        load_bn(ops[bn], weights, f"{prefix}.{bn_key}")
    if "layer_scale" in ops:
      assign(ops["layer_scale"].gamma, weights.take(f"{prefix}.layer_scale.gamma"),
              f"{prefix}.layer_scale.gamma", weights.source)
  return load


# How timm names each kind of block's tensors, by the block record its layer builds.
_TIMM_LOADERS = {
    S.ConvBN: _chain_loader([("conv", "conv.weight", "bn", "bn1")]),
    S.FusedIB: _chain_loader([("expand", "conv_exp.weight", "expand_bn", "bn1"),
                              ("project", "conv_pwl.weight", "project_bn", "bn2")]),
    S.UIB: _chain_loader([("start_dw", "dw_start.conv.weight", "start_dw_bn", "dw_start.bn"),
                          ("expand", "pw_exp.conv.weight", "expand_bn", "pw_exp.bn"),
                          ("middle_dw", "dw_mid.conv.weight", "middle_dw_bn", "dw_mid.bn"),
                          ("project", "pw_proj.conv.weight", "project_bn", "pw_proj.bn")]),
    S.MQA: _load_mqa,
}


def _load_block(block, weights: TimmWeights, prefix: str) -> None:
  from mnv4_train.models import layers as L
  _TIMM_LOADERS[type(L.block_spec_of(block))](block, weights, prefix)


def _check_config(config_path: str, config: dict, model: str) -> tuple | None:
  """Refuses architectures the weights cannot tell apart; returns the config's (mean, std)."""
  arch = str(config.get("architecture", "")).split(".")[0]
  if arch:
    if "_aa_" in arch or "_blur_" in arch:
      raise ConfigError(f"{config_path} names {arch}, an anti-aliased MobileNetV4 (blur-pooled "
                        "strided convs) that our model does not implement; convert a plain "
                        "mobilenetv4_* model")
    if not arch.startswith(TIMM_NAMES[model]):
      raise ConfigError(f"{config_path} names {arch}, but the weights have the {model} layout "
                        f"({TIMM_NAMES[model]}); the folder mixes files of two models")
  pretrained = config.get("pretrained_cfg") or {}
  mean, std = pretrained.get("mean"), pretrained.get("std")
  if mean and std and len(mean) == 3 and len(std) == 3:
    return tuple(mean), tuple(std)
  return None


def from_timm(path: str, *, model: str, inputs: str = "project"):
  """Our Keras `model` variant carrying the weights of timm's MobileNetV4 safetensors at `path`.

  `inputs="project"` gives a model taking [-1, 1] images (timm's ImageNet normalisation is its
  fixed first layer); `"timm"` one taking timm-normalised images. Raises ConfigError if the file
  holds another variant (naming it) or is not a timm MNv4.
  """
  if inputs not in INPUTS:
    raise ConfigError(f"unknown --input {inputs!r}; choose {' or '.join(INPUTS)}")
  from mnv4_train import models
  spec = models.get_spec(model)
  weights = TimmWeights(read_safetensors(path), path)
  found = identify_timm(weights)
  if found is None:
    from mnv4_train import convert_efficientnet  # pylint: disable=import-outside-toplevel
    if convert_efficientnet.file_layout(weights) is not None:
      raise ConfigError(f"{path} holds a timm EfficientNet, not a MobileNetV4; pass --model "
                        "efficientnet_b0 ... efficientnet_l2 (the variant it is)")
    raise ConfigError(f"{path}'s block layout matches no MobileNetV4 variant; pass the "
                      f"model.safetensors of one of timm's {', '.join(TIMM_NAMES.values())}")
  if found != model:
    raise ConfigError(f"{path} holds timm's {TIMM_NAMES[found]} ({found}) weights, not "
                      f"{model}; pass --model {found}")
  config_path, config = read_timm_config(path)
  source_norm = _check_config(config_path, config, model) or (IMAGENET_MEAN, IMAGENET_STD)
  if "classifier.weight" not in weights.tensors:
    raise ConfigError(f"{path} has no classifier.weight (a headless timm model); convert a "
                      "checkpoint with its classifier")
  num_classes = weights.shape("classifier.weight")[0]
  normalization = source_norm if inputs == "project" else None
  keras_model = models.build(model, num_classes=num_classes, filters=_out_channels(weights, spec),
                             source_normalization=normalization, **TIMM_SETTINGS)
  stem = _ops(keras_model.get_layer("stem"))
  load_conv(stem["conv"], weights, "conv_stem.weight")
  load_bn(stem["bn"], weights, "bn1")
  for s, stage in enumerate(spec.stages):
    for i in range(len(stage)):
      _load_block(keras_model.get_layer(f"stage{s}_block{i}"), weights, f"blocks.{s}.{i}")
  _load_block(keras_model.get_layer("stage4_conv"), weights, "blocks.4.0")
  head = _ops(keras_model.get_layer("head_conv"))
  load_conv(head["conv"], weights, "conv_head.weight")
  load_bn(head["bn"], weights, "norm_head")
  logits = keras_model.get_layer("logits")
  assign(logits.kernel, weights.take("classifier.weight").T, "classifier.weight", path)
  assign(logits.bias, weights.take("classifier.bias"), "classifier.bias", path)
  leftover = weights.unused()
  if leftover:
    raise ConfigError(f"{path} has {len(leftover)} tensors our {model} has no place for (e.g. "
                      f"{', '.join(leftover[:3])}); it is not a plain timm {TIMM_NAMES[model]}")
  return keras_model


def check_out(out: str, overwrite: bool, inputs: dict) -> None:
  """Refuses an `--out` that overlaps an input, or that exists and is not a Keras model file
  (one is replaced only with `overwrite`)."""
  ownership.check_overlap(out, inputs)
  if not os.path.lexists(out):
    return
  if os.path.isdir(out) or not zipfile.is_zipfile(out) or "config.json" not in (
      zipfile.ZipFile(out).namelist()):
    raise InputPathError(f"--out {out} exists and is not a .keras model file; it is never "
                         "replaced: choose another --out")
  if not overwrite:
    raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it or choose "
                      "another --out")


def save_keras(model, out: str) -> None:
  """`model.save` through a temporary name in the same folder, renamed into place."""
  folder = os.path.dirname(os.path.abspath(out))
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".keras", dir=folder)
    os.close(fd)
    model.save(tmp)
    os.replace(tmp, out)
  except OSError as e:
    problem = ownership.storage_problem(e, folder)
    if problem is not None:
      raise problem from None
    raise
  finally:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)


def _convert_efficientnet(args) -> None:
  from mnv4_train import convert_efficientnet as E
  model = E.from_timm(args.from_timm, model=args.model, inputs=args.input,
                      resolution=args.resolution, width=args.width_coefficient,
                      depth=args.depth_coefficient)
  save_keras(model, args.out)
  size = model.input_shape[1]
  print(f"wrote {args.out}: {args.model} from timm's {E.VARIANTS[args.model].timm_name}, "
        f"{model.get_layer('predictions').units} classes, {model.count_params():,} parameters, "
        f"fixed {size}x{size} input (data_prep.distill reads it from the file); inputs: "
        + ("[-1, 1] (--teacher_input minus_one_to_one)" if args.input == "project"
           else "ImageNet mean/std-normalised, as timm"))


def main(argv: list[str] | None = None) -> int:
  quiet_tensorflow(False)  # before Keras loads TensorFlow (on use, below)
  parser = ArgumentParser(prog="mnv4_train.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--from_timm", required=True, metavar="SAFETENSORS",
                      help="timm's model.safetensors of a mobilenetv4_* or tf_efficientnet_* "
                           "model")
  parser.add_argument("--model", required=True,
                      help="the variant the file holds: conv_s ... hybrid_l (MobileNetV4), or "
                           "efficientnet_b0 ... efficientnet_b8, efficientnet_l2 (timm's "
                           "tf_efficientnet_*, see mnv4_train/convert_efficientnet.py)")
  parser.add_argument("--out", required=True, help="the .keras file to write")
  parser.add_argument("--input", default="project", choices=INPUTS,
                      help="project (default): the model takes [-1, 1] images; timm: it takes "
                           "ImageNet mean/std-normalised images, as timm's model does")
  parser.add_argument("--resolution", type=int, default=None,
                      help="EfficientNet only: the fixed input size (TF 'same' padding depends "
                           "on it; default: config.json's input size, else the variant's)")
  parser.add_argument("--width_coefficient", type=float, default=None,
                      help="EfficientNet only: override the variant's width coefficient")
  parser.add_argument("--depth_coefficient", type=float, default=None,
                      help="EfficientNet only: override the variant's depth coefficient")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing .keras file at --out (nothing else is replaced)")
  args = parser.parse_args(argv)
  with exit_on_user_error(parser.prog):
    if not args.out.endswith(".keras"):
      raise ConfigError(f"--out {args.out} must end in .keras (a Keras 3 model file)")
    check_out(args.out, args.overwrite, {"--from_timm": args.from_timm})
    if args.model.startswith("efficientnet"):
      _convert_efficientnet(args)
      return 0
    extra = [f for f in ("resolution", "width_coefficient", "depth_coefficient")
             if getattr(args, f) is not None]
    if extra:
      raise ConfigError(f"--{extra[0]} is for EfficientNet teachers (--model efficientnet_*); "
                        f"a MobileNetV4 --model {args.model} takes the file's own layout")
    model = from_timm(args.from_timm, model=args.model, inputs=args.input)
    save_keras(model, args.out)
    stem = model.get_layer("stem")
    print(f"wrote {args.out}: {args.model} from timm's {TIMM_NAMES[args.model]}, "
          f"{model.get_layer('logits').units} classes, {model.count_params():,} parameters; "
          f"padding={stem.padding}, BatchNorm epsilon={stem.bn_epsilon}, "
          f"activation={stem.activation}; inputs: "
          + ("[-1, 1] (pixel / 127.5 - 1)" if args.input == "project"
             else "ImageNet mean/std-normalised, as timm"))
  return 0


if __name__ == "__main__":
  run_then_exit(main)
