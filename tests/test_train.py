"""`python pipelines/train.py` options: what the command line decides and what it leaves to the preset."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_models.registry import build_captioner, presets
from pipelines.concept_pretraining import PRETRAINED_WEIGHTS, pretrain_concepts
from pipelines.dataset import epoch_variable
from pipelines.text import build_vocabulary, make_tokenizer
from pipelines.train import parse_args
from pipelines.training import TimeBudget, warmup_cosine

REPO = Path(__file__).resolve().parent.parent


def test_the_saved_config_names_synthetic_sizes_only_for_the_synthetic_set():
    assert parse_args([])[0].synthetic == {"n_train": 16000, "n_valid": 1000, "n_test": 1000}
    assert parse_args(["--synthetic-size", "80", "10", "10"])[0].synthetic["n_train"] == 80
    assert parse_args(["--dataset", "pipelines/examples"])[0].synthetic is None
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "pipelines/examples", "--synthetic-size", "80", "10", "10"])


def test_backbone_settings_from_the_command_line_are_literals_and_must_exist_in_each_model_trained(capsys):
    cfg, _ = parse_args(["--model", "git", "--backbone", "dropout=0", "--backbone", "vision_stem=conv",
                         "--backbone", "concept_quadrants=False"])
    assert cfg.backbone == {"dropout": 0, "vision_stem": "conv", "concept_quadrants": False}
    assert parse_args(["--backbone", "dropout=0.2"])[0].backbone == {"dropout": 0.2}  # in both backbones
    for argv, message in [(["--model", "git", "--backbone", "dropuot=0"], "dropuot: not a setting of the git backbone"),
                          (["--backbone", "vision_num_layers=1"], "with --model all a setting must exist in both"),
                          (["--backbone", "dropout"], "expected KEY=VALUE"),
                          (["--model", "git", "--backbone", "num_layers=two"], "num_layers is an int (now 2)"),
                          (["--model", "git", "--backbone", "concept_quadrants=1"], "concept_quadrants is a bool"),
                          (["--model", "git", "--backbone", "vision_stem=3"], "vision_stem is a str (now 'conv')")]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_the_image_size_from_the_command_line_must_fit_gits_patches(capsys):
    assert parse_args([])[0].image_size is None  # the preset decides
    assert parse_args(["--image-size", "160"])[0].image_size == 160
    assert parse_args(["--model", "cnn_gru", "--image-size", "150"])[0].image_size == 150  # no patches there
    for argv, message in [(["--image-size", "150"], "use a multiple of 16 (e.g. 144)"),
                          (["--model", "git", "--backbone", "patch_size=32", "--image-size", "144"], "multiple of 32"),
                          (["--model", "cnn_gru", "--image-size", "24"], "at least 32 pixels")]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_run_at_another_image_size_trains_and_saves_the_model_at_that_size(tmp_path):
    command = [sys.executable, "pipelines/train.py", "--dataset", "pipelines/examples", "--model", "git",
               "--preset", "tiny", "--epochs", "1", "--image-size", "48", "--vocab-size", "200", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "images 48 px" in done.stdout
    (model_path,) = tmp_path.glob("*/git/model.keras")
    done_info = json.loads((model_path.parent / "DONE.json").read_text())
    assert (done_info["image_size"], done_info["augment"]) == (48, True)  # tiny augments (no preset setting)
    assert "| git | tiny (48 px, augmented) |" in (model_path.parent.parent / "report.md").read_text()
    model = keras.saving.load_model(model_path)
    assert model.image_config["image_size"] == 48  # the preprocessing the SavedModel exports reads it from here
    assert model.backbone.vision_encoder.embedding.num_positions == (48 // 16) ** 2 + 1  # tiny's own 32 px: 5
    assert len(model.generate(np.zeros((1, 48, 48, 1), "float32"), max_length=4)) == 1


def test_augmentation_follows_the_flag_else_the_preset():
    assert parse_args([])[0].augment is None  # the preset decides
    assert parse_args(["--augment"])[0].augment is True
    assert parse_args(["--no-augment"])[0].augment is False
    # the CPU presets gained nothing from it within their budgets (README, "Training"); the others keep it
    assert presets("cnn_gru")["small"]["train"]["augment"] is False
    assert presets("git")["small"]["train"]["augment"] is False
    assert presets("cnn_gru")["densenet121"]["train"].get("augment", True) is True


def run_budget(minutes: float, epochs: int, epoch_seconds: float | list[float], deadline_in: float | None = None,
               trace_seconds: float = 0.0, reserve_epochs: float = 0.0, schedule=None) -> tuple[bool, bool]:
    """(stopped, reported as cut by the budget) for epochs that sleep `epoch_seconds`.

    With `trace_seconds`, each epoch runs 4 batches and the first batch of the first epoch sleeps that much
    longer (as tracing the step makes it); `epoch_seconds` is then the epochs' time without it.
    """
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    budget = TimeBudget(minutes, None if deadline_in is None else time.perf_counter() + deadline_in,
                        reserve_epochs=reserve_epochs, schedule=schedule)
    budget.set_model(model)
    budget.set_params({"epochs": epochs, **({"steps": 4} if trace_seconds else {})})
    model.stop_training = False
    budget.on_train_begin()
    for epoch in range(epochs):
        budget.on_epoch_begin(epoch)
        seconds = epoch_seconds[epoch] if isinstance(epoch_seconds, list) else epoch_seconds
        if trace_seconds:
            for batch in range(4):
                time.sleep(seconds / 4 + (trace_seconds if epoch == batch == 0 else 0.0))
                budget.on_train_batch_end(batch)
        else:
            time.sleep(seconds)
        budget.on_epoch_end(epoch)
        if model.stop_training:
            return True, budget.stopped_early
    return False, budget.stopped_early


def test_time_budget_stops_only_an_epoch_that_would_overrun_and_reports_only_real_cuts():
    assert run_budget(0.5 / 60, 3, 0.2) == (True, True)  # 0.5 s budget, 0.2 s epochs: the third would overrun
    assert run_budget(0.5 / 60, 2, 0.2) == (False, False)  # the last planned epoch is not "stopped by the budget"
    assert run_budget(0, 2, 0.0) == (False, False)  # 0 = no budget
    # Against the model's budget the next epoch takes the median of those after the first (which also traces):
    # after 0.1 + 0.5 + 0.5 + 0.2 s another 0.5 s would pass 1.7 s although the last one took 0.2 s ...
    assert run_budget(1.7 / 60, 6, [0.1, 0.5, 0.5, 0.2, 0.2, 0.2]) == (True, True)
    # ... and one slow epoch does not cut the run (after 0.4 + 0.05 + 0.3 s the median is 0.175 s, the slowest 0.3 s).
    assert run_budget(1.0 / 60, 6, [0.4, 0.05, 0.3, 0.05, 0.05, 0.05]) == (False, False)
    assert run_budget(0.9 / 60, 8, [0.4] + [0.02] * 7) == (False, False)  # a slow first epoch (tracing) is not the estimate
    # Tracing in the first batch is not part of the next epoch's estimate: after 0.3 + 0.4 s, 0.3 s more fit in 1.1 s
    assert run_budget(1.1 / 60, 2, 0.3, trace_seconds=0.4) == (False, False)
    assert run_budget(0.9 / 60, 2, 0.3, trace_seconds=0.4) == (True, True)  # ... but not in 0.9 s
    # Concept pretraining keeps time for the captioner: 0.2 s epochs, 2 more of them reserved, a 0.9 s budget
    assert run_budget(0.9 / 60, 3, 0.2, reserve_epochs=2) == (True, True)  # after 0.4 s, 0.2 + 0.4 more would pass it
    assert run_budget(0.9 / 60, 3, 0.2) == (False, False)
    assert run_budget(0, 3, 0.2, deadline_in=0.9, reserve_epochs=2) == (True, True)  # the run's deadline too


def test_the_runs_deadline_stops_training_even_without_a_model_budget():
    assert run_budget(0, 5, 0.1, deadline_in=0.25) == (True, True)  # after 2 epochs a 3rd would end past it
    assert run_budget(0, 3, 0.05, deadline_in=5.0) == (False, False)
    # against the run's hard limit the slowest later epoch counts: after 0.2 + 0.3 + 0.05 s another 0.3 s passes 0.8 s
    assert run_budget(0, 5, [0.2, 0.3, 0.05, 0.05, 0.05], deadline_in=0.8) == (True, True)
    assert run_budget(0, 3, 0.05) == (False, False)  # neither budget nor deadline


def test_the_learning_rate_decays_by_the_last_epoch_that_fits():
    # 0.2 s epochs in a 0.9 s budget: after the first, 3 more fit (4 of 8), and the 4th is the last one run
    schedule = warmup_cosine(1e-3, 8, 10)
    assert run_budget(0.9 / 60, 8, 0.2, schedule=schedule) == (True, True)
    assert schedule.planned_epochs == 4
    assert float(schedule(40)) == pytest.approx(5e-5)  # annealed at the end of epoch 4 of 10 steps each
    # Concept pretraining's plan also leaves the captioner's reserved epochs: 0.2 s + 2 x 0.2 s more of 0.9 s
    schedule = warmup_cosine(1e-3, 8, 10)
    assert run_budget(0.9 / 60, 8, 0.2, reserve_epochs=2, schedule=schedule) == (True, True)
    assert schedule.planned_epochs == 2
    # the run's deadline too (one epoch at the slowest, the rest at the median): 0.1 s epochs, 0.45 s
    schedule = warmup_cosine(1e-3, 8, 10)
    assert run_budget(0, 8, 0.1, deadline_in=0.45, schedule=schedule) == (True, True)
    assert schedule.planned_epochs == 4
    # A first plan a tenth into the first epoch (here after batch 1 of 4): a fit cut to that epoch anneals in it
    schedule = warmup_cosine(1e-3, 3, 4)
    assert run_budget(0.5 / 60, 3, 0.3, trace_seconds=0.01, schedule=schedule) == (True, True)
    assert schedule.planned_epochs == 1
    schedule = warmup_cosine(1e-3, 3, 4)
    assert run_budget(0.75 / 60, 3, 0.3, trace_seconds=0.01, schedule=schedule) == (True, True)
    assert schedule.planned_epochs == 2
    # with time to spare the plan stays as it was
    schedule = warmup_cosine(1e-3, 3, 10)
    assert run_budget(1.0 / 60, 3, 0.05, schedule=schedule) == (False, False)
    assert schedule.planned_epochs == 3


def test_the_run_budget_defaults_to_the_15_minute_target_and_can_be_lifted():
    assert parse_args([])[0].run_time_budget_minutes == 14.5
    assert parse_args(["--run-time-budget", "0"])[0].run_time_budget_minutes == 0


def test_a_run_out_of_time_stops_its_budgeted_training_after_one_epoch_and_still_evaluates(tmp_path):
    command = [sys.executable, "pipelines/train.py", "--dataset", "pipelines/examples", "--model", "cnn_gru",
               "--preset", "tiny", "--epochs", "4", "--time-budget", "5", "--run-time-budget", "0.01",
               "--vocab-size", "200", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Run time budget: stopping after epoch 1" in done.stdout
    (summary,) = tmp_path.glob("*/summary.json")
    model = json.loads(summary.read_text())["models"]["cnn_gru"]
    assert model["epochs_run"] == 1 and model["stopped_by_time_budget"]
    assert "fields" in model["metrics"]  # the evaluation still ran


def weights_of(model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


def test_concept_pretraining_trains_once_then_resumes_instead_of_repeating(tmp_path):
    captions = ["ct chest left small nodule", "mri brain right large mass", "xray hand normal"]
    tokenizer = make_tokenizer(build_vocabulary(captions * 10, 100))
    images = np.random.RandomState(0).uniform(-1, 1, (3, 32, 32, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices({"images": images, "captions": captions}).batch(3)

    def attempt(seed: int, epochs: int = 2):
        keras.utils.set_random_seed(seed)
        model = build_captioner("cnn_gru", "tiny", tokenizer, concept_loss_weight=1.0)
        untrained = weights_of(model)
        info = pretrain_concepts(model, data, data, epochs, warmup_cosine(1e-2, epochs, 1), tmp_path, epoch_variable(),
                                 tf.distribute.get_strategy())
        return model, untrained, info

    first, untrained, info = attempt(0)
    # training on its validation data, the word loss only falls: both epochs run, the last is kept
    assert info["status"] == "trained" and info["epochs"] == info["best_epoch"] == 2 and info["val_word_loss"] > 0
    assert info["stopped_by_time_budget"] is False and not list(tmp_path.glob("partial.*"))
    assert len((tmp_path / "concept_history.csv").read_text().splitlines()) == 1 + 2  # header + one row per epoch
    assert any(not np.array_equal(a, b) for a, b in zip(untrained, weights_of(first)))
    assert (tmp_path / PRETRAINED_WEIGHTS).is_file() and not (tmp_path / "backup_concepts").exists()

    # killed before the captioner's first backup: the finished pretraining is loaded, not repeated, and the
    # report gives the epochs it ran, not the ones the run planned
    second, untrained, info = attempt(1, epochs=5)
    assert info["status"].startswith("loaded") and info["seconds"] == 0 and info["epochs"] == 2
    for a, b in zip(weights_of(first), weights_of(second)):
        np.testing.assert_array_equal(a, b)

    # once the captioner has its own backup, that restores every weight: nothing to do here
    (tmp_path / "backup").mkdir()
    third, untrained, info = attempt(2)
    assert info["status"].startswith("restored")
    for a, b in zip(untrained, weights_of(third)):
        np.testing.assert_array_equal(a, b)


def test_concept_pretraining_is_a_preset_default_the_command_line_overrides():
    assert parse_args([])[0].concept_epochs is None  # the preset decides
    assert parse_args(["--concept-epochs", "0"])[0].concept_epochs == 0
    with pytest.raises(SystemExit):
        parse_args(["--concept-epochs", "-1"])
    assert presets("cnn_gru")["small"]["train"]["concept_epochs"] > 0
    assert presets("cnn_gru")["tiny"]["train"].get("concept_epochs", 0) == 0  # tiny has no concept head


def test_concept_epochs_on_a_preset_without_a_concept_head_stop_with_a_clear_message(tmp_path):
    command = [sys.executable, "pipelines/train.py", "--dataset", "pipelines/examples", "--model", "cnn_gru",
               "--preset", "tiny", "--epochs", "1", "--concept-epochs", "2", "--vocab-size", "200", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "has no concept head" in done.stderr and "Traceback" not in done.stderr


def test_concept_pretraining_keeps_the_epoch_with_the_lowest_validation_word_loss(tmp_path):
    # the validation captions use the vocabulary's other words and none of the training ones: each step on
    # the training words makes the validation word loss worse, so epoch 1 is the best and epoch 3 (the second
    # without improvement) the last
    train_caps = ["ct chest left nodule", "mri brain right mass"]
    valid_caps = ["xray hand normal ultrasound thyroid cyst"] * 2
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = make_tokenizer(specials + " ".join(train_caps + valid_caps[:1]).split())
    images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 1)).astype("float32")
    train = tf.data.Dataset.from_tensor_slices({"images": images, "captions": train_caps}).batch(2)
    valid = tf.data.Dataset.from_tensor_slices({"images": images, "captions": valid_caps}).batch(2)

    def pretrained(epochs: int, out: Path):
        out.mkdir()
        keras.utils.set_random_seed(0)
        model = build_captioner("cnn_gru", "tiny", tokenizer, concept_loss_weight=1.0)
        info = pretrain_concepts(model, train, valid, epochs, warmup_cosine(1e-2, epochs, 1), out, epoch_variable(),
                                 tf.distribute.get_strategy())
        return model, info

    stopped, info = pretrained(5, tmp_path / "a")
    assert info["epochs"] == 3 and info["best_epoch"] == 1
    one_epoch, _ = pretrained(1, tmp_path / "b")  # the same first epoch, with nothing to stop
    for a, b in zip(weights_of(one_epoch), weights_of(stopped)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_frozen_image_stem_keeps_its_weights_and_statistics_while_the_rest_trains():
    captions = ["ct chest left nodule", "mri brain right mass"]
    tokenizer = make_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + " ".join(captions).split())
    keras.utils.set_random_seed(0)
    model = build_captioner("cnn_gru", "tiny", tokenizer, concept_loss_weight=1.0)  # compact CNN, filters 8, 16
    assert model.backbone.freeze_image_stem() == [f"block{b}_conv{i}{part}" for b in (1, 2) for i in (1, 2)
                                        for part in ("", "_bn", "_relu")]
    stem = [w for layer in model.backbone.image_stem_layers() for w in layer.weights]  # BN moving statistics too
    later = model.backbone.image_encoder.projection.weights  # above the CNN: keeps training
    stem_before, later_before = [w.numpy().copy() for w in stem], [w.numpy().copy() for w in later]
    images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 1)).astype("float32") + 2.0  # far from init stats
    model.fit(tf.data.Dataset.from_tensor_slices({"images": images, "captions": captions}).batch(2).repeat(3),
              verbose=0)
    for w, before in zip(stem, stem_before):
        np.testing.assert_array_equal(w.numpy(), before, err_msg=w.path)
    assert all(not np.allclose(w.numpy(), b) for w, b in zip(later, later_before))  # its kernel and bias


@pytest.mark.parametrize("name, options", [("cnn_gru", {}), ("git", {"vision_stem": "conv"})])
def test_a_frozen_stem_stays_frozen_in_the_keras_file_and_its_optimizer_reloads(tmp_path, name, options):
    captions = ["ct chest left nodule", "mri brain right mass"]
    tokenizer = make_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + " ".join(captions).split())
    keras.utils.set_random_seed(0)
    model = build_captioner(name, "tiny", tokenizer, concept_loss_weight=1.0, **options)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    trainable_before = len(model.trainable_weights)
    frozen = model.backbone.freeze_image_stem()
    images = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 1)).astype("float32")
    model.fit(tf.data.Dataset.from_tensor_slices({"images": images, "captions": captions}).batch(2), verbose=0)
    model.save(tmp_path / "model.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert not [str(w.message) for w in caught if "optimizer" in str(w.message)]
    assert reloaded.backbone.image_stem_frozen and frozen
    assert not any(layer.trainable for layer in reloaded.backbone.image_stem_layers())
    assert len(reloaded.trainable_weights) == len(model.trainable_weights) < trainable_before
    for a, b in zip(model.optimizer.variables, reloaded.optimizer.variables):  # the moments came back too
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_only_the_conv_stems_of_our_presets_freeze():
    tokenizer = make_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "chest"])
    assert presets("cnn_gru")["small"]["train"]["freeze_stem"] and presets("git")["small"]["train"]["freeze_stem"]
    assert not presets("git")["base"]["train"].get("freeze_stem")  # imported checkpoints: no conv stem to freeze
    conv = build_captioner("git", "tiny", tokenizer, vision_stem="conv")
    assert conv.backbone.image_stem_layers() == [conv.backbone.vision_encoder.embedding.patch_embedding]
    assert build_captioner("git", "tiny", tokenizer).backbone.image_stem_layers() == []  # CLIP's patch conv
    assert parse_args([])[0].freeze_stem is None and parse_args(["--no-freeze-stem"])[0].freeze_stem is False


def test_a_small_preset_run_pretrains_concepts_then_trains_and_reports_it(tmp_path):
    command = [sys.executable, "pipelines/train.py", "--dataset", "pipelines/examples", "--model", "cnn_gru",
               "--epochs", "1", "--concept-epochs", "1", "--time-budget", "0", "--vocab-size", "200",
               "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "concept pretraining: 1 epochs" in done.stdout
    assert "[cnn_gru] image stem frozen for the captioner's epochs: block1_conv1, " in done.stdout
    (run,) = [p.parent for p in tmp_path.glob("*/summary.json")]
    model = json.loads((run / "summary.json").read_text())["models"]["cnn_gru"]
    assert model["concept_pretraining"]["status"] == "trained" and model["concept_pretraining"]["best_epoch"] == 1
    assert model["frozen_stem_layers"][:2] == ["block1_conv1", "block1_conv1_bn"]
    assert model["epochs_run"] == 1 and "fields" in model["metrics"]
    assert len((run / "cnn_gru" / "concept_history.csv").read_text().splitlines()) == 2
    assert not (run / "cnn_gru" / PRETRAINED_WEIGHTS).exists()  # the finished model holds them
    report = (run / "report.md").read_text()
    assert "| 1 epochs, " in report
    assert len(model["metrics"]["fields_by_study"]) > 1 and "### By study" in (run / "cnn_gru" / "report.md").read_text()
    assert "weakest study" not in report  # every study of the example set has under 20 images: none is ranked
    assert "shuffle=True" not in done.stderr  # the datasets shuffle; fit() is told so
