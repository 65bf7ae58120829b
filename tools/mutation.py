"""A small, fixed mutation check: each mutant is a bug the tests must catch (``make mutation``).

Every mutant replaces one exact code snippet in hpa's source by a buggy
variant.  For each mutant the tree is copied to a temporary folder (the
working tree is never touched: other people edit it), the snippet is replaced
there, and only the tests that should catch the bug run against the copy,
with ``PYTHONPATH`` pointing at it so that the copy's ``hpa`` is imported, not
the editable install.  A mutant *survives* when those tests pass.

A mutant whose snippet no longer occurs exactly as often as it says is
*stale*: a refactor moved the code, and the mutant must be rewritten rather
than silently dropped.  Survivors and stale mutants make the exit status 1.
Every test that killed a mutant is then run once more on the unmutated copy
(all of them in one pytest run); one that fails there too is left out, listed,
and its mutants are run again without it, so a tree that is already failing is
not mistaken for killed mutants.  Only the killing tests run unmutated, not
every test a mutant names.

    python tools/mutation.py            # all mutants
    python tools/mutation.py -k cones   # mutants whose name contains "cones"
    python tools/mutation.py --list
    python tools/mutation.py --check    # seconds: every snippet occurs as often as it says, every test exists
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Import names of the packages, and the folders of the tree they come from (pyproject's package-dir).
PACKAGES = {"hpa": "hpa", "hpa_plugins": "plugins", "hpa_zoo": "zoo"}


@dataclass(frozen=True)
class Mutant:
    """Replace ``old`` by ``new`` in the files matching ``where`` (globs); ``tests`` must then fail."""

    name: str
    where: tuple[str, ...]
    old: str
    new: str
    tests: tuple[str, ...]
    count: int = 1  # how often ``old`` occurs across those files; every occurrence is replaced


TIES = "tests/test_ties.py"
CONES = "tests/test_cones.py"
PROJECTION = "tests/test_projection.py"
SKIPS = "tests/test_skip_reasons.py"
FILES = "tests/test_files.py"
OUT_DIR = "tests/test_out_dir.py"
MCN = "tests/test_matconvnet_loader.py"
REINIT = "hpa/experiments/reinit.py"
NUMBERS = "tests/test_reinit_numbers.py"
SAFETY = "tests/test_safety_paths.py"
CIFAR = "plugins/cifar_task.py"
SEEDS_SUMMARY = "tests/test_open_run.py::test_frames_and_the_summary_of_several_seeds_hold_each_seeds_values"
ONNX_FILES = ("hpa/backends/onnx_graph.py", "hpa/backends/onnx/*.py")
LOOP = "hpa/experiments/loop.py"
DATA = "hpa/experiments/data.py"
AUGMENT = "hpa/experiments/augment.py"
NOISE = "hpa/experiments/noise.py"
TYPES = "hpa/experiments/types.py"
FIELDS = "tests/test_recipe_fields.py"
PLAIN = f"{FIELDS}::test_trained_weights_equal_a_plain_loop_that_reads_the_recipe"
PIXEL_NOISE = f"{FIELDS}::test_pixel_permutations_reach_the_images_trained_on_seeded_by_the_noise_seed"
EDGES = "tests/test_cli_edges.py"
OUTSIDE = f"{EDGES}::test_a_value_just_outside_its_bound_is_refused_before_anything_is_written"
AT_BOUNDS = f"{EDGES}::test_values_exactly_at_their_bounds_train"
TS_FLOW = "tests/test_torchscript_control_flow.py"

MUTANTS = (
    # -- the twelve bugs of the audit that no test caught (issue 12) --
    Mutant("projection: n_l counts c < 0", ("plugins/projection.py",),
           "np.mean(live <= 0)", "np.mean(live < 0)", (TIES,)),
    Mutant("cones: OUT_FULL_IN needs Delta < 0", ("hpa/cones.py",),
           "torch.where(u <= r_max, _OUT_FULL_IN", "torch.where(u < r_max, _OUT_FULL_IN", (TIES,)),
    Mutant("cones: OUT_* states need A > 0", ("hpa/cones.py",),
           "a_nonneg = (upper.apex - a_min) >= 0", "a_nonneg = (upper.apex - a_min) > 0", (TIES,)),
    Mutant("cones: IN_FULL_OUT needs Delta > 0", ("hpa/cones.py",),
           "torch.where(u >= r_max, _IN_FULL_OUT", "torch.where(u > r_max, _IN_FULL_OUT", (TIES,)),
    Mutant("matconvnet: bnorm without moments not listed", ("hpa/backends/matconvnet.py",),
           'skipped.append(Skipped(op.name, "bnorm layer has no moments',
           'skipped and None and (Skipped(op.name, "bnorm layer has no moments', (SKIPS,)),
    Mutant("cones: linear and 1-D layers not listed", ("plugins/cones.py",),
           "for layer in graph if layer.name not in taking_part]",
           "for layer in graph if layer.name not in taking_part and layer.kind == 'conv2d']", (SKIPS,)),
    Mutant("projection: 'layer has no weights' not listed", ("plugins/projection.py",),
           'return "layer has no weights"', "return None", (PROJECTION, SKIPS)),
    Mutant("cones: rotation leaves out the 0 of non-overlapping shifts", ("hpa/cones.py",),
           "if self.has_zero:", "if False:", (TIES,)),
    Mutant("cones: dilation ignored", ("hpa/cones.py",),
           "if dilation is None or all(d == 1 for d in dilation):", "if True:", (TIES,)),
    Mutant("cones: plane read as (W, H)", ("plugins/cones.py",),
           "return tuple(int(s) for s in layer.input_shape[1:])",
           "return tuple(int(s) for s in layer.input_shape[:0:-1])", (TIES,)),
    Mutant("projection: fully-connected rule ignores padding", ("plugins/projection.py",),
           "(k - 1) * d + 1 == n + begin + end", "(k - 1) * d + 1 == n", (TIES,)),
    Mutant("projection: fully-connected rule ignores dilation", ("plugins/projection.py",),
           "(k - 1) * d + 1 == n + begin + end", "k == n + begin + end", (TIES,)),
    # -- mutants the audit's tests already killed --
    Mutant("projection: no sqrt(n) normalisation", ("plugins/projection.py",),
           "sums[valid] / (norms[valid] * np.sqrt(n))", "sums[valid] / norms[valid]", (PROJECTION,)),
    Mutant("fold: BatchNorm scale without the square root", ("hpa/fold.py",),
           "return g / np.sqrt(var + eps)", "return g / (var + eps)", ("tests/test_fold.py",)),
    Mutant("cones: grouped-conv channel mapping", ("hpa/cones.py",),
           "up_w = up_w.transpose(0, 2, 1, 3, 4)", "up_w = up_w.transpose(0, 1, 2, 3, 4)", (CONES,)),
    Mutant("cones: bias not split over the channels", ("hpa/cones.py",),
           "np.repeat((b / per_group)[:, None]", "np.repeat(b[:, None]", (CONES,)),
    Mutant("torch trace: zero pad begin/end swapped", ("hpa/backends/torch_trace.py",),
           "(begin + pad[2 * k], end + pad[2 * k + 1])", "(begin + pad[2 * k + 1], end + pad[2 * k])",
           ("tests/test_torch_trace.py",)),
    Mutant("torch trace: 'same' padding extra pixel at the begin", ("hpa/backends/torch_trace.py",),
           "return tuple((t // 2, t - t // 2) for t in totals)", "return tuple((t - t // 2, t // 2) for t in totals)",
           ("tests/test_torch_trace.py",)),
    # TorchScript has no padding code of its own (it builds layers with the tracer's make_layer), so its
    # mutant is the same line, caught by a test that reads a TorchScript archive only.
    Mutant("TorchScript: 'same' padding extra pixel at the begin", ("hpa/backends/torch_trace.py",),
           "return tuple((t // 2, t - t // 2) for t in totals)", "return tuple((t - t // 2, t // 2) for t in totals)",
           ("tests/test_cross_backend.py::test_torchscript_same_padding_is_the_one_torch_applies",)),
    Mutant("TorchScript: a zero pad before a conv is dropped", ("hpa/backends/torchscript_graph.py",),
           "    elif op in _PAD_ARGS:\n", "    elif False:\n", ("tests/test_torch_trace.py",)),
    Mutant("matconvnet: pad begin/end swapped", ("hpa/backends/matconvnet.py",),
           "return ((n[0], n[1]), (n[2], n[3]))", "return ((n[1], n[0]), (n[3], n[2]))", (MCN,)),
    Mutant("matconvnet: kernel H and W axes swapped", ("hpa/backends/matconvnet.py",),
           'reshape(dims, order="F").transpose(3, 2, 0, 1)', 'reshape(dims, order="F").transpose(3, 2, 1, 0)',
           (MCN,)),
    # -- hpa/files.py: --out never loses the old result, never replaces what hpa did not write --
    Mutant("files: --out deletes the old result, then writes in place", ("hpa/files.py",),
           "            os.mkdir(staging)\n            yield staging\n            write_manifest(staging)\n",
           "            _remove_tree(target)\n            staging = target\n            os.makedirs(staging)\n"
           "            yield staging\n            write_manifest(staging)\n            return\n", (FILES, OUT_DIR)),
    Mutant("files: the swap deletes the old result before renaming the new one in", ("hpa/files.py",),
           "    if _exchange(staging, target):\n        return staging\n",
           "    _remove_tree(target)\n    os.rename(staging, target)\n    return None\n", (FILES,)),
    Mutant("files: manifest check skipped (a folder with foreign files is replaced)", ("hpa/files.py",),
           "    found = foreign_entry(folder, nested)\n    if found is None:\n        return\n",
           "    found = None\n    if found is None:\n        return\n", (FILES, OUT_DIR)),
    Mutant("files: a file changed since hpa wrote it counts as hpa's", ("hpa/files.py",),
           "if name in listed and (not path.is_file() or _fingerprint(path) != listed[name]):",
           "if False:", (FILES,)),
    Mutant("files: the staging folder is left behind when the writer fails", ("hpa/files.py",),
           "            _remove_tree(staging)\n            for folder in reversed(created):\n",
           "            for folder in reversed(created):\n", (FILES,)),
    # -- the trainer's speed and launch choices (issue 11); each names its killing test, since the files'
    # other tests (minutes of training and launching) would run first --
    Mutant("trainer: the recorded --cpu-threads is not applied", ("hpa/experiments/trainer.py",),
           "        if self.config.cpu_threads is not None:\n",
           "        if False:\n",
           ("tests/test_fast_path.py::test_training_runs_on_the_recorded_thread_count_and_restores_the_callers",)),
    Mutant("trainer: freed host memory still goes back to the kernel", ("hpa/experiments/loop.py",),
           "    libc.mallopt(m_mmap_max, 0)\n",
           "    libc.mallopt(m_mmap_max, 65536)\n",
           ("tests/test_fast_path.py::test_cpu_training_keeps_freed_host_memory_mapped",)),
    Mutant("launcher: another rank's error is not reported", ("hpa/experiments/distributed.py",),
           "        self._report(rank, code)\n",
           "", ("tests/test_ddp.py::test_a_failure_of_another_rank_is_reported_once_and_stops_rank_0",)),
    Mutant("launcher: torch._dynamo imported only after the group is made", ("hpa/experiments/distributed.py",),
           "    import torch._dynamo  # noqa: F401\n", "",
           ("tests/test_ddp.py::test_closing_the_group_ends_its_worker_threads",)),
    # -- the experiment half's numbers and safety code (issue 17) --
    Mutant("reinit: uint8 test pixels not scaled to [0, 1]", ("hpa/experiments/data.py",),
           "self.scale = 1 / 255 if images.dtype == np.uint8 else 1.0", "self.scale = 1.0",
           (f"{NUMBERS}::test_uint8_checkpoint_cells_equal_a_plain_loop",)),
    Mutant("reinit: the spread over draws is the sample std (ddof 1)", (REINIT,),
           "return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))",
           "return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))",
           (f"{NUMBERS}::test_rerandomized_cells_are_the_mean_and_spread_of_their_draws",)),
    Mutant("reinit: a re-randomised cell is its first draw, not the mean of its draws", (REINIT,),
           "row = self._row(layer, None, _mean(accuracies), _mean([l for _, l in results]))",
           "row = self._row(layer, None, accuracies[0], results[0][1])",
           (f"{NUMBERS}::test_rerandomized_cells_are_the_mean_and_spread_of_their_draws",)),
    Mutant("reinit: every draw of a layer is the same draw", (REINIT,),
           "[self.subject.seed, self.draw_seed, index, draw]", "[self.subject.seed, self.draw_seed, index, 0]",
           (f"{NUMBERS}::test_rerandomized_cells_are_the_mean_and_spread_of_their_draws",)),
    Mutant("reinit: --reset-bn ignored", (REINIT,),
           "self.roles = LAYER_ROLES + (BN_ROLES if reset_bn else ())", "self.roles = LAYER_ROLES",
           (f"{NUMBERS}::test_float32_checkpoint_cells_with_and_without_reset_bn",)),
    Mutant("reinit: the BatchNorm is reset without --reset-bn", (REINIT,),
           "self.roles = LAYER_ROLES + (BN_ROLES if reset_bn else ())", "self.roles = LAYER_ROLES + BN_ROLES",
           (f"{NUMBERS}::test_float32_checkpoint_cells_with_and_without_reset_bn",)),
    Mutant("reinit: a re-randomised BatchNorm keeps its trained statistics", (REINIT,),
           "fresh[key] = torch.full_like(self.live[key], _FRESH_BN[role])", "fresh[key] = self.live[key].clone()",
           (f"{NUMBERS}::test_rerandomized_cells_are_the_mean_and_spread_of_their_draws",)),
    Mutant("reinit: criticality read from the last checkpoint", (REINIT,),
           "first = self.heatmap()[0]", "first = self.heatmap()[-1]",
           (f"{NUMBERS}::test_float32_criticality_and_both_spearman_correlations",)),
    Mutant("reinit: the bias correlation uses n_l - 0.5, not |n_l - 0.5|", (REINIT,),
           '("bias", [abs(v - 0.5) for v in n_l])', '("bias", [v - 0.5 for v in n_l])',
           (f"{NUMBERS}::test_float32_criticality_and_both_spearman_correlations",)),
    Mutant("reinit: Pearson instead of Spearman", (REINIT,),
           "from scipy.stats import spearmanr", "from scipy.stats import pearsonr as spearmanr",
           (f"{NUMBERS}::test_float32_criticality_and_both_spearman_correlations",)),
    Mutant("reinit: the relative drop divided by the reset accuracy", (REINIT,),
           '"relative_drop": (trained - accuracy) / trained if trained > 0 else None}',
           '"relative_drop": (trained - accuracy) / accuracy if accuracy > 0 else None}',
           (f"{NUMBERS}::test_float32_checkpoint_cells_with_and_without_reset_bn",)),
    Mutant("reinit: the loss is a sum of batch means", ("hpa/experiments/loop.py",),
           'total_loss += F.cross_entropy(logits, labels, reduction="sum").double()',
           "total_loss += F.cross_entropy(logits, labels).double()",
           (f"{NUMBERS}::test_float32_checkpoint_cells_with_and_without_reset_bn",)),
    Mutant("reinit: the final n_l of several seeds is the first seed's", (REINIT,),
           "return _mean(values) if values else None", "return values[0] if values else None",
           ("tests/test_reinit.py::test_several_seeds_give_a_heatmap_each_and_the_mean",)),
    Mutant("files: a leftover of another user's live process (EPERM) is deleted", ("hpa/files.py",),
           '    except PermissionError:\n        return "foreign"\n',
           '    except PermissionError:\n        return "gone"\n',
           (f"{SAFETY}::test_leftover_of_another_users_live_process_is_kept_and_reported",)),
    Mutant("files: a kept leftover of a live process is kept silently", ("hpa/files.py",),
           '            warnings.warn(f"kept {entry.path}', '            None and warnings.warn(f"kept {entry.path}',
           (f"{SAFETY}::test_temp_file_of_another_users_live_process_is_kept_and_reported",)),
    Mutant("files: a dead writer's leftover is kept", ("hpa/files.py",),
           '    except ProcessLookupError:\n        return "gone"\n',
           '    except ProcessLookupError:\n        return "running"\n',
           (f"{FILES}::test_atomic_write_removes_a_dead_writers_temp_file",)),
    Mutant("files: another machine's leftover judged by its pid here", ("hpa/files.py",),
           'match["name"] == target.name and match["host"] == _HOST_TAG):', 'match["name"] == target.name):',
           (f"{FILES}::test_after_kill_9_the_next_write_removes_only_dead_hpa_staging",)),
    Mutant("cifar unpickler: every numpy.* global allowed", (CIFAR,),
           "        if (module, name) in self._ALLOWED:\n",
           '        if (module, name) in self._ALLOWED or module.split(".")[0] == "numpy":\n',
           (f"{SAFETY}::test_unpickling_payload_is_refused_and_runs_nothing",)),
    Mutant("cifar unpickler: only the module checked", (CIFAR,),
           "        if (module, name) in self._ALLOWED:\n", "        if module in {m for m, _ in self._ALLOWED}:\n",
           (f"{SAFETY}::test_unpickling_payload_is_refused_and_runs_nothing",)),
    Mutant("cifar unpickler: only the name checked", (CIFAR,),
           "        if (module, name) in self._ALLOWED:\n", "        if name in {n for _, n in self._ALLOWED}:\n",
           (f"{SAFETY}::test_unpickling_payload_is_refused_and_runs_nothing",)),
    Mutant("cifar unpickler: builtins allowed", (CIFAR,),
           "        if (module, name) in self._ALLOWED:\n",
           '        if (module, name) in self._ALLOWED or module == "builtins":\n',
           (f"{SAFETY}::test_unpickling_payload_is_refused_and_runs_nothing",)),
    Mutant("imagefolder: train and val classes compared by count, not by name", ("plugins/imagefolder_task.py",),
           '    if train["classes"] != test["classes"]:', '    if len(train["classes"]) != len(test["classes"]):',
           ("tests/test_imagefolder.py::test_class_folders_that_differ_by_name_are_refused",)),
    Mutant("imagefolder: val labels in another class order than train's", ("plugins/imagefolder_task.py",),
           'train["labels"], test["images"], test["labels"],',
           'train["labels"], test["images"], len(test["classes"]) - 1 - test["labels"],',
           ("tests/test_imagefolder.py::test_labels_name_the_same_class_in_train_and_val",)),
    Mutant("seeds summary: the std over seeds is the sample std (ddof 1)", ("hpa/experiments/seeds.py",),
           'summary[f"{column}.std"] = float(np.std(values))', 'summary[f"{column}.std"] = float(np.std(values, ddof=1))',
           (SEEDS_SUMMARY,)),
    Mutant("seeds summary: the mean over seeds is the first seed's value", ("hpa/experiments/seeds.py",),
           'summary[f"{column}.mean"] = float(np.mean(values))', 'summary[f"{column}.mean"] = float(values[0])',
           (SEEDS_SUMMARY,)),
    Mutant("open_run: every seed's series rows labelled with the first seed", ("hpa/experiments/open_run.py",),
           '{"seed": seed, "epoch": int(row["epoch"])', '{"seed": self.seeds[0], "epoch": int(row["epoch"])',
           (SEEDS_SUMMARY,)),
    Mutant("open_run: every seed's metrics labelled with the first seed", ("hpa/experiments/open_run.py",),
           '{"seed": seed, **', '{"seed": self.seeds[0], **',
           (SEEDS_SUMMARY,)),
    Mutant("stats: a re-analysed epoch's old series rows are kept beside the new", ("hpa/experiments/stats.py",),
           'kept = [row for row in self.rows if int(row["epoch"]) != epoch]', "kept = list(self.rows)",
           ("tests/test_analyse_run.py::test_analyse_run_gives_what_training_with_the_statistic_gives",)),
    # -- recipe and noise fields at non-default values, and the edges of accepted values (issue 17, part 2);
    # each is killed by tests/test_recipe_fields.py or tests/test_cli_edges.py (a tiny net on 40 images) --
    Mutant("recipe: --momentum ignored (always 0.9)", (LOOP,),
           "lr=recipe.lr, momentum=recipe.momentum,", "lr=recipe.lr, momentum=0.9,", (f"{PLAIN}[step]",)),
    Mutant("recipe: --weight-decay ignored (always 5e-4)", (LOOP,),
           "weight_decay=recipe.weight_decay, **kernel)", "weight_decay=5e-4, **kernel)", (f"{PLAIN}[step]",)),
    Mutant("recipe: --step-factor ignored (always 0.1)", (TYPES,),
           "return self.lr * self.step_factor ** (done // self.step_epochs)",
           "return self.lr * 0.1 ** (done // self.step_epochs)", (f"{PLAIN}[step]",)),
    Mutant("recipe: the first step decay one epoch early", (TYPES,),
           "return self.lr * self.step_factor ** (done // self.step_epochs)",
           "return self.lr * self.step_factor ** (epoch // self.step_epochs)", (f"{PLAIN}[step]",)),
    Mutant("recipe: the exponential schedule decays in the first epoch already", (TYPES,),
           "return self.lr * self.gamma ** done", "return self.lr * self.gamma ** epoch", (f"{PLAIN}[exponential]",)),
    Mutant("recipe: the constant schedule decays by --step-factor", (TYPES,),
           '        if self.schedule == "step":\n', '        if self.schedule in ("step", "constant"):\n',
           (f"{PLAIN}[constant]",)),
    Mutant("recipe: --no-flip still flips", (AUGMENT,),
           "    if not flip:\n        flips = torch.zeros_like(flips)\n",
           "    if False:\n        flips = torch.zeros_like(flips)\n", (f"{PLAIN}[step]",)),
    Mutant("recipe: vertical shifts only downwards (0..S, not -S..S)", (AUGMENT,),
           "    dy = torch.randint(0, 2 * shift + 1, (batch,), generator=gen)",
           "    dy = torch.randint(0, shift + 1, (batch,), generator=gen)", (f"{PLAIN}[step]",)),
    Mutant("recipe: --batch-size ignored (always 128)", (LOOP,),
           "data.train_batches(seed, epoch, recipe.batch_size)", "data.train_batches(seed, epoch, 128)",
           (f"{PLAIN}[step]",)),
    Mutant("recipe: the held-out images are trained on too", (DATA,),
           "images, labels = dataset.train_images[train_idx], trained_on[train_idx]",
           "images, labels = dataset.train_images, trained_on", (f"{PLAIN}[step]",)),
    Mutant("recipe: dropout draws the same masks every epoch", (LOOP,),
           'torch.manual_seed(stream_seed(seed, "dropout", epoch))', 'torch.manual_seed(stream_seed(seed, "dropout", 0))',
           (f"{FIELDS}::test_dropout_masks_differ_between_epochs_and_repeat_with_the_seed",)),
    Mutant("recipe: the held-out count of a class floored, not rounded", (DATA,),
           "count = int(round(fraction * len(members)))", "count = int(fraction * len(members))",
           (f"{FIELDS}::test_validation_holds_out_round_f_times_each_class",)),
    Mutant("noise: the corrupted labels are recorded but the clean ones trained on", (DATA,),
           "trained_on = dataset.train_labels if train_labels is None else train_labels",
           "trained_on = dataset.train_labels", (f"{FIELDS}::test_label_noise_reported_is_the_fraction_trained_on",)),
    Mutant("noise: --noise-seed ignored (the run seed draws the corruption)", (DATA,),
           "seed = config.seed if config.noise.noise_seed is None else config.noise.noise_seed",
           "seed = config.seed", (f"{PIXEL_NOISE}[random_pixels]",)),
    Mutant("noise: the test images' permutations are the training images' first ones", (NOISE,),
           "pixel_orders(len(test), size, seed, 1)", "pixel_orders(len(test), size, seed, 0)",
           (f"{PIXEL_NOISE}[random_pixels]",)),
    Mutant("noise: --shuffle-pixels draws a permutation per image", (NOISE,),
           '    if kind == "shuffle_pixels":\n        record["pixels"] = "one permutation"',
           '    if False:\n        record["pixels"] = "one permutation"', (f"{PIXEL_NOISE}[shuffle_pixels]",)),
    Mutant("noise: Gaussian images with one mean and std for all channels", (NOISE,),
           "return noise * np.asarray(std, np.float32).reshape(per_channel) + "
           "np.asarray(mean, np.float32).reshape(per_channel)",
           "return noise * np.float32(np.mean(std)) + np.float32(np.mean(mean))",
           (f"{FIELDS}::test_gaussian_images_have_the_training_parts_channel_moments",)),
    Mutant("edges: a --validation that leaves no training image creates the run", (DATA,),
           "    if len(train_index) == 0:\n", "    if False:\n", (f"{OUTSIDE}[--validation 0.95]",)),
    Mutant("edges: a negative --seed reaches numpy", ("hpa/experiments/config.py",),
           'if given["seed"] is not None and given["seed"] < 0:', "if False:", (f"{OUTSIDE}[--seed -1]",)),
    Mutant("edges: --label-noise 1 refused", (TYPES,),
           "if not 0.0 <= noise.label_noise <= 1.0:", "if not 0.0 <= noise.label_noise < 1.0:", (AT_BOUNDS,)),
    Mutant("edges: --momentum 0 refused", (TYPES,),
           "if not getattr(recipe, name) >= 0 or not math.isfinite", "if not getattr(recipe, name) > 0 or not math.isfinite",
           (AT_BOUNDS,)),
    Mutant("edges: a CIFAR label equal to the number of classes accepted", (CIFAR,),
           "not all(0 <= int(v) < num_classes for v in labels)", "not all(0 <= int(v) <= num_classes for v in labels)",
           (f"{EDGES}::test_a_cifar_label_must_name_one_of_the_classes[10-False]",)),
    Mutant("edges: reinit --draws 1 refused", (REINIT,),
           "    if draws < 1:\n", "    if draws <= 1:\n", (f"{EDGES}::test_reinit_at_its_edges_works",)),
    # -- the scan half's newer readers (issue 18) --
    Mutant("TorchScript: sibling ifs share one scope", ("hpa/backends/torchscript_graph.py",),
           "        counters[op] = counters.get(op, 0) + 1\n", "        counters[op] = counters.get(op, 0)\n",
           ("tests/test_torchscript_sibling_ifs.py::test_sibling_ifs_get_scopes_of_their_own",)),
    Mutant("TorchScript: a loop body read without its scope", ("hpa/backends/torchscript_graph.py",),
           '        inner = path if path == scope else f"{path}/body"\n', "        inner = scope\n",
           (f"{TS_FLOW}::test_convs_in_loops_are_found_once_per_body",)),
    Mutant("quantized: the zero point subtracted after scaling", ("hpa/backends/onnx/quantized.py",),
           "    if zero_point is not None:\n        values -= _broadcast(np.asarray(zero_point, np.float32), shape, axis)\n"
           "    values *= _broadcast(np.asarray(scale, np.float32), shape, axis)\n",
           "    values *= _broadcast(np.asarray(scale, np.float32), shape, axis)\n    if zero_point is not None:\n"
           "        values -= _broadcast(np.asarray(zero_point, np.float32), shape, axis)\n",
           ("tests/test_quantized.py::test_weights_are_dequantized_and_numbers_are_the_dequantized_models",)),
    Mutant("quantized: DequantizeLinear's axis attribute ignored (per-channel scales along axis 1)",
           ("hpa/backends/onnx/constants.py",),
           'axis=int(attrs.get("axis", 1)) % max(x.ndim, 1)', "axis=1 % max(x.ndim, 1)",
           ("tests/test_quantized_per_channel.py::test_per_channel_scales_run_along_the_filters",)),
    Mutant("Lightning: a checkpoint's foreign globals imported and called, not inert placeholders",
           ("hpa/backends/torch_files.py",),
           "        allowed = _weights_only_globals().get(qualified)\n",
           "        return pickle.Unpickler.find_class(self, module, name)\n",
           ("tests/test_lightning_checkpoints.py::test_an_extra_entry_that_would_run_code_never_runs",)),
    Mutant("Lightning: a placeholder's call goes unrecorded (code-asking entries accepted)",
           ("hpa/backends/torch_files.py",),
           "        cls._hpa_log.calls.append(cls._hpa_global)\n", "",
           ("tests/test_lightning_checkpoints.py::test_an_extra_entry_that_would_run_code_never_runs",)),
    Mutant("state_dict: a linear layer named like an embedding skipped despite its bias", ("hpa/backends/state_dict.py",),
           'if words & _EMBEDDING_WORDS and len(shape) == 2 and "bias" not in tensors:',
           "if words & _EMBEDDING_WORDS and len(shape) == 2:",
           ("tests/test_state_dict_norms.py::test_a_linear_layer_named_like_an_embedding_keeps_its_bias_and_stays_linear",)),
    Mutant("state_dict: norm1, ln_1 not read as norms (digits not a word break)", ("hpa/backends/state_dict.py",),
           'return {w for w in re.split(r"[_\\d]+", name.lower()) if w}',
           'return {w for w in re.split(r"_+", name.lower()) if w}',
           ("tests/test_state_dict_norms.py::test_norms_embeddings_and_tokens_are_listed_never_analysed",)),
    # -- ONNX last: its loader is being split into a package, so these are found by snippet --
    Mutant("onnx: pads begin/end swapped", ONNX_FILES,
           "return tuple((pads[i], pads[i + dims]) for i in range(dims))\n",
           "return tuple((pads[i + dims], pads[i]) for i in range(dims))\n", ("tests/test_onnx_loader.py",)),
    Mutant("onnx: auto_pad SAME_UPPER and SAME_LOWER swapped", ONNX_FILES,
           'pairs.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))',
           'pairs.append((large, small) if auto_pad == "SAME_UPPER" else (small, large))',
           ("tests/test_onnx_loader.py", "tests/test_onnx_conformance.py"), count=2),
)


def source_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files: what the tests of the working tree see."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, target: Path) -> None:
    for name in source_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)
    # The import names, pointing into the copy, so PYTHONPATH finds them before the editable install
    # (whose finder sits at the end of sys.meta_path).
    imports = target / ".mutation-path"
    imports.mkdir()
    for package, folder in PACKAGES.items():
        (imports / package).symlink_to(target / folder, target_is_directory=True)


def matches(tree: Path, mutant: Mutant) -> list[Path]:
    files = sorted({p for pattern in mutant.where for p in tree.glob(pattern) if p.is_file()})
    return [p for p in files if mutant.old in p.read_text()]


def occurrences(tree: Path, mutant: Mutant) -> int:
    return sum(p.read_text().count(mutant.old) for p in matches(tree, mutant))


def apply(tree: Path, mutant: Mutant) -> None:
    for path in matches(tree, mutant):
        path.write_text(path.read_text().replace(mutant.old, mutant.new))


def run_tests(tree: Path, tests: tuple[str, ...], first_failure: bool,
              deselect: list[str] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree / ".mutation-path"), HPA_DISABLE_PLUGIN_AUTOLOAD="1",
               PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    command += [arg for node in deselect for arg in ("--deselect", node)]
    if first_failure:
        command.append("-x")
    return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)


def failed_nodes(proc: subprocess.CompletedProcess) -> list[str]:
    """The node ids of the FAILED and ERROR lines of pytest's short summary (``-rfE``)."""
    return [line.split(" ", 1)[1].split(" - ")[0] for line in proc.stdout.splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


def pristine_failures(tree: Path, nodes: list[str]) -> set[str] | None:
    """Which of ``nodes`` (tests that killed a mutant) fail on the unmutated tree too; None when pytest cannot run.

    A test that fails without any mutant would "kill" every mutant, so it cannot count as a kill.
    """
    proc = run_tests(tree, tuple(nodes), first_failure=False)
    if proc.returncode not in (0, 1):
        print(proc.stdout[-3000:] + proc.stderr[-3000:])
        print(f"mutation: the unmutated tests could not run (pytest exit {proc.returncode}); fix that first")
        return None
    return set(failed_nodes(proc))


def run_mutant(pristine: Path, mutant: Mutant, left_out: list[str]) -> tuple[int, str]:
    """Run ``mutant``'s tests on a mutated copy of ``pristine`` and print the verdict; returns (pytest exit, killer)."""
    tree = pristine.parent / "mutant"
    shutil.copytree(pristine, tree, symlinks=False, ignore=shutil.ignore_patterns(".mutation-path"))
    (tree / ".mutation-path").mkdir()
    for package, folder in PACKAGES.items():
        (tree / ".mutation-path" / package).symlink_to(tree / folder, target_is_directory=True)
    apply(tree, mutant)
    started = time.monotonic()
    proc = run_tests(tree, mutant.tests, first_failure=True, deselect=left_out)
    verdict = "killed" if proc.returncode == 1 else "SURVIVED" if proc.returncode == 0 else \
        f"ERROR (pytest exit {proc.returncode})"
    by = next(iter(failed_nodes(proc)), "")
    print(f"{verdict:9} {time.monotonic() - started:5.1f}s  {mutant.name}" + (f"  (by {by})" if by else ""),
          flush=True)
    if proc.returncode not in (0, 1):
        print(proc.stdout[-1500:] + proc.stderr[-1500:])
    shutil.rmtree(tree)
    return proc.returncode, by


def check_imports(tree: Path) -> None:
    """The copy's packages are what a test imports, not the working tree's."""
    env = dict(os.environ, PYTHONPATH=str(tree / ".mutation-path"))
    code = "import hpa, hpa_plugins; print(hpa.__file__); print(hpa_plugins.__file__)"
    found = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True,
                           check=True).stdout.split()
    if not all(Path(f).resolve().is_relative_to(tree.resolve()) for f in found):
        raise SystemExit(f"mutation: the copy is not what gets imported ({found}); aborting")


def check(chosen: list[Mutant]) -> int:
    """Stale mutants, and named tests that pytest cannot find (a moved test would make its mutant ERROR)."""
    stale = [m for m in chosen if occurrences(ROOT, m) != m.count]
    for mutant in stale:
        print(f"STALE     {mutant.name}: {mutant.old!r} occurs {occurrences(ROOT, mutant)} times in "
              f"{', '.join(mutant.where)}, expected {mutant.count}")
    nodes = sorted({test for mutant in chosen for test in mutant.tests})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *nodes],
                          cwd=ROOT, capture_output=True, text=True)
    missing = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR")]
    for line in missing:
        print(f"MISSING   {line}")
    print(f"mutation --check: {len(chosen)} mutants, {len(stale)} stale, {len(nodes)} named tests, "
          f"{'none' if proc.returncode == 0 else 'some'} missing")
    return 1 if stale or proc.returncode != 0 else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true",
                        help="only check that no mutant is stale and that every test it names exists (after a refactor)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}  [{', '.join(mutant.where)}]  -> {' '.join(mutant.tests)}")
        return 0
    if args.check:
        return check(chosen)
    with tempfile.TemporaryDirectory(prefix="hpa-mutation-") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_tree(ROOT, pristine)
        check_imports(pristine)
        stale = [m for m in chosen if occurrences(pristine, m) != m.count]
        live = [m for m in chosen if m not in stale]
        results = {mutant.name: run_mutant(pristine, mutant, []) for mutant in live}
        left_out: list[str] = []
        checked: set[str] = set()
        while True:  # a kill counts only if the killing test passes unmutated
            unchecked = sorted({by for code, by in results.values() if code == 1 and by and by not in checked})
            if not unchecked:
                break
            failing = pristine_failures(pristine, unchecked)
            if failing is None:
                return 1
            checked.update(unchecked)
            for node in sorted(failing):
                print(f"WARNING   fails without a mutant, left out: {node}")
            left_out += sorted(failing)
            for mutant in live:
                if results[mutant.name][0] == 1 and results[mutant.name][1] in failing:
                    results[mutant.name] = run_mutant(pristine, mutant, left_out)
        survivors = [mutant for mutant in live if results[mutant.name][0] != 1]
    for mutant in stale:
        print(f"STALE     {mutant.name}: {mutant.old!r} occurs {occurrences(ROOT, mutant)} times in "
              f"{', '.join(mutant.where)}, expected {mutant.count}; rewrite the mutant")
    print(f"mutation: {len(live) - len(survivors)} of {len(live)} mutants killed, {len(survivors)} survived, "
          f"{len(stale)} stale")
    return 1 if survivors or stale else 0


if __name__ == "__main__":
    sys.exit(main())
