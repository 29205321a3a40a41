"""`medssl finetune seg`: 3D segmentation fine-tuning with few labels, from scratch or a pretrained encoder.

Modules: `config` (schema), `cases` (which volumes, checked and loaded), `training` (network, crops,
objective, layer-wise groups), `metrics` (Dice / HD95, CSV), `task` (`finetune_seg`).

Network: the MONAI network of `build_segmentation_network(config.model, K)` (K classes), plus 1x1x1
deep-supervision heads on the decoder's stride-2 and stride-4 maps with `seg.deep_supervision`; with
`pretrained`, `load_pretrained` loads, as `seg.pretrained_parts` says (auto: what the checkpoint holds),
the encoder only (an encoder.pt; the decoder stays randomly initialised) or the whole network (a network.pt
of a whole-network pretraining: every tensor but an output layer of another number of classes). Every
tensor meant to load must load, else a UserError naming the missing keys; the load report (loaded /
missing / unexpected / shape-mismatched, the output layer left random) goes into summary.json.

Preprocessing: with a pretrained checkpoint its stored preprocessing (modality, spacing, intensity
window or percentiles, crop size, orientation) is used; each field that differs from the fine-tuning
config is a warning naming both values (printed to stderr and listed in summary.json "warnings").

Data: `seg.labelled_volumes` training volumes are chosen per patient (`select_labelled`): patients in a
seeded order, their first studies first, so n volumes come from min(n, patients) patients, and the
selection for n is inside the one for n + 1 (nested). Every labelled, validation and test volume is
checked before the run directory is created: its label map must share the image's shape and affine,
hold only the configured classes (`seg.labels`, default the manifest's `labels`) and not be empty.
Training micro-batch i holds `train.batch_size` crops of `crop_size` from the labelled volumes (whole
preprocessed volumes, padded to at least the crop), drawn by generators seeded by (seed, i): a share
`seg.crops.uniform_fraction` placed uniformly, the others centred on a voxel of a class drawn with the odds
`seg.crops.ratios` (MONAI `RandCropByLabelClassesd`), then `seg.augment`ed by MONAI transforms (RandAffined
on a larger crop so rotated corners hold data, RandFlipd on `flip_axes`, intensity scale / shift, Gaussian
noise; the label follows every spatial step, nearest-neighbour). `seg.crops.sampler: uniform` with
`seg.augment.enabled: false` gives the original uniform crops draw for draw.

Training: Dice + cross-entropy (`monai.losses.DiceCELoss`, softmax, one-hot target, `seg.class_weights`;
`monai.losses.DeepSupervisionLoss` with deep supervision) through the shared `Trainer`.
`seg.freeze_encoder_steps`: the encoder's parameters get no gradient (so AdamW leaves them
untouched, weight decay included) for the first N optimiser steps. `seg.layer_decay` (d <= 1): layer-wise
learning-rate decay; the decoder and head train at `train.lr`, encoder stage i of S (stages in the order
of `VolumeEncoder.parts`, fine to coarse; a ModuleList part gives one stage per element) at
lr x d^(S - i), so the stem, the most generic layer, moves least.

Evaluation (validation every `seg.eval_every` steps, `checkpoints/best.pt` on validation Dice; test
with the best checkpoint, or the last one without validation cases): sliding-window inference
(`monai.inferers.sliding_window_inference`, ROI = crop size) on the whole preprocessed volume; the
softmax probabilities go back to the input's grid through the inverse of the preprocessing
(`monai.transforms.Invertd`: padding, resampling, orientation), and their argmax is the prediction.
Metrics are computed there, against the label file, with MONAI: per-class Dice (`DiceMetric`) and 95 %
Hausdorff distance in mm (`HausdorffDistanceMetric(percentile=95)` with the input's spacing), background
excluded. A class absent from both prediction and truth has no Dice (NaN); HD95 is NaN when either is
empty; means skip NaNs.

Run directory (DESIGN 3.2): config.yaml, metrics.jsonl, tb/, checkpoints/last.pt and best.pt (kind
"finetune-seg"), summary.json (flat keys: test_dice_mean, test_hd95_mean, test_dice_<class>, ..., the
pretrained load report, wall-clock seconds),
predictions/<image name>.nii.gz (uint8 label maps with the input's affine), test_cases.csv (per-case
metrics) and test_overlay.png (prediction over the image on a few slices).
"""
