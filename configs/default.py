"""The paper's recipe (docs/fidelity.md) as one ConfigDict; model files override the model, variants shrink it.

Values the paper or the authors' code do not confirm for MediaEval are marked UNVERIFIED. An epoch is one pass
over the training TRACKS (one crop each), as in the authors' trainer: 9,949 tracks on split-0.
Run: `python -m emorf_jax.main --config=configs/default.py[:variant] --workdir=runs/default` (the CP-ResNet, as
configs/cp_resnet.py). Variants (`--config=configs/faresnet.py:demo`), and their cost with this file's model:
    (none)  the paper: 200 epochs on the prepared MTG-Jamendo split-0 shards (`dataset.data_dir`), 994.9 steps of 10
            an epoch, ~199,000 steps. ESTIMATED ~1.5 h on one H200 GPU: ~41 min of steps at 1.25 ms per 861-frame
            example (the 0.62 ms per 431-frame example MEASURED for the paper-width FA-ResNet on an H200, float32,
            batch 16, 2026-12-04, times 2.02 by XLA's FLOP count), about doubled by validation (`eval_every_epochs`).
            ESTIMATED ~2 months on 2 CPU cores (1.3 s per example from the 0.65 s MEASURED at batch 8 on 2 vCPU AMD
            EPYC, idle, 2026-12-01): impractical. Step figures: benchmarks/RESULTS.md.
    demo    the embedded default: a synthetic MTG-Jamendo made in the workdir, a small net. MEASURED 252 s on 2 idle
            CPU cores (2026-12-01, `benchmarks.paper_table`'s CP_ResNet row, data made before), plus ~1 min making
            the data (57 s MEASURED in the FA-ResNet demo, 2 CPU cores, 2026-12-05).
    test    tiny and fast, for the unit tests. ESTIMATED 1-2 min on 2 CPU cores, data included (`benchmarks.paper_table
            --quick` trained every row's `:test` config in 22 min 28 s, MEASURED 2026-12-01, 2 cores at load ~10).
    dcase   the paper's, with the authors' DCASE values where the MediaEval ones are unknown (timing, stereo input).
            ESTIMATED ~6.5 h on one H200 (400 epochs: ~398,000 steps, ~83 min; validation every epoch makes it
            ~4.7x that) and ~9 months on 2 CPU cores, from the same figures.
"""

import ml_collections

# The authors' DCASE schedule (their `configs/cp_resnet.json`: lr constant to 50, linear decay to 250, then lr/100;
# SWA from 250 every 3 epochs; snapshots when epoch > 250 and epoch % 5 == 0 in their `trainer.py`; 400 epochs, the
# `--epochs` default of their experiment scripts, which replaces the json's 350) with its milestones halved for the
# 200 epochs the MediaEval paper reports. The scaling itself is UNVERIFIED.
_PAPER_EPOCHS = 200
_DCASE_EPOCHS = 400


def _scaled(dcase_epoch: int) -> float:
    return dcase_epoch * _PAPER_EPOCHS / _DCASE_EPOCHS


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.dataset = ml_collections.ConfigDict()
    config.dataset.data_dir = ""  # TFDS data_dir of `python -m data_prep.build`; "" = <workdir>/data (demo)
    config.dataset.config_name = "hop512"  # builder config = feature setting (docs/fidelity.md, "Features")
    config.dataset.split_index = 0  # split-0 is the MediaEval split
    # The demo's own data, made by demo.py (main.py runs it) in <workdir>/data when no prepared dataset is there:
    config.dataset.synthetic_tracks = 0  # > 0: make a synthetic MTG-Jamendo of this many tracks
    config.dataset.synthetic_seed = 0
    config.dataset.synthetic_subset = "moodtheme"  # whose tag names the planted sounds take (data_prep.synthetic)
    config.dataset.synthetic_duration = 6.0  # median track length in seconds (lengths spread like the real ones)
    config.dataset.chunk_frames = 0  # stored chunk length of that data; 0 = the feature setting's 20 s
    config.dataset.workers = 2  # processes that make and prepare that data
    # True: each stored record's TFRecord checksums are checked on its first read (data_prep.reader.FrameReader), so
    # a damaged shard stops training with an error naming it and its byte offset. Cost: one checksum pass over each
    # record's bytes, on its first read only, so it slows the first epoch's reading and not the later epochs'.
    # Figures: benchmarks/RESULTS.md, section "Checksums".
    config.dataset.verify_checksums = False

    # 0: the prepared dataset's tag count (56 on the real MTG-Jamendo, the paper's; 9 on the synthetic one), so every
    # variant runs on either; a nonzero value must equal the data's.
    config.num_classes = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "cp_resnet"  # emorf_jax/models/registry.py; the baselines' configs replace `model` whole
    config.model.rho = 5  # the authors' default ρ
    config.model.max_rf = 0  # > 0: use the largest-RF ρ whose published RF is not above this, instead of `rho`
    config.model.base_channels = 128
    config.model.frequency_aware = False
    # True: every block rolls its conv1 input along frequency by a random -50..50 rows, in training AND evaluation
    # (the authors' FA-ResNet option `features_shift`, which none of their published configs sets; docs/fidelity.md).
    config.model.features_shift = False
    config.model.shake_shake = False

    config.input = ml_collections.ConfigDict()
    config.input.crop_frames = 861  # UNVERIFIED: training crop length; 861 frames = 10 s at 86.13 frames/s
    config.input.max_time_shift = 50  # the authors' random circular shift of up to ±50 frames
    config.input.eval_window_frames = 1722  # UNVERIFIED: whole tracks in 20-s windows, logits averaged by length
    config.input.read_threads = 2  # threads that read and crop training examples

    # Global, over all devices (a multiple of the device count). 10 is the authors' DCASE code's, the only evidence;
    # UNVERIFIED for MediaEval.
    config.batch_size = 10
    config.eval_batch_size = 16
    config.num_epochs = _PAPER_EPOCHS

    config.learning_rate = 1e-4  # Adam, betas (0.9, 0.999), no weight decay
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    # Per epoch e: lr while e <= lr_constant_epochs, then a linear decay towards 0 that would reach it at
    # lr_decay_end_epoch, where (and after which) the rate is lr * lr_final_factor (lr/100, the SWA phase's).
    config.lr_constant_epochs = _scaled(50)
    config.lr_decay_end_epoch = _scaled(250)
    config.lr_final_factor = 0.01

    config.mixup_alpha = 0.3  # one λ ~ Beta(α, α) per example, replaced by max(λ, 1 - λ); 0 disables mixup

    # The loss (emorf_jax/losses.py; evidence in docs/fidelity.md, "Training"). pos_weight 10: the authors'
    # `BCEWithLogitsLoss(pos_weight=10)` (their `criterion_mixup_upweight`), and their submitted FA runs are
    # calibrated as it predicts (mean probability 0.16-0.20 on the test set against a positive rate of 0.032, a
    # median per-tag odds ratio of 7-9). The baselines' configs set 1 (`use_plain_bce`).
    config.loss = ml_collections.ConfigDict()
    config.loss.pos_weight = 10.0
    # "batch_mean": every mixup criterion of the authors reduces each target's BCE first, so the two targets'
    # losses are weighed by the batch's mean λ; "per_example": by each example's own λ.
    config.loss.mixup_reduction = "batch_mean"

    config.weight_average = ml_collections.ConfigDict()
    config.weight_average.kind = "swa"  # "swa": equal-weight running average (the authors'); "ema"; "none"
    config.weight_average.start_epoch = _scaled(250)
    config.weight_average.every_epochs = 3.0  # UNVERIFIED for MediaEval: the DCASE interval, not scaled
    config.weight_average.ema_decay = 0.999  # only for kind="ema"
    config.bn_reestimate_batches = 0  # batches to re-estimate BN of the averaged weights; 0 = one training epoch

    config.snapshots = ml_collections.ConfigDict()
    config.snapshots.start_epoch = _scaled(250)
    config.snapshots.every_epochs = 5.0  # the authors' interval; UNVERIFIED whether it was scaled for MediaEval
    config.snapshots.ensemble_size = 5  # "snapshot averaging" averages the last 5 snapshots' predictions

    config.selection_metric = "loss"  # the authors selected the lowest validation loss; or "PR-AUC-macro"
    # The authors validated every epoch, on 10-s DCASE clips. Here validation scores whole tracks (223 h of audio
    # for the 3,802 split-0 validation tracks), current and averaged weights: each forward-only pass costs about
    # 2.7 training epochs (9,949 10-s crops, forward and backward), so every epoch would make a run about 6x longer
    # and every 5 about 2x. It changes only which checkpoint is "best", not the SWA model or the snapshots.
    config.eval_every_epochs = 5.0
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 100
    config.half_precision = False  # bfloat16 compute, float32 parameters

    # Fine-tuning (emorf_jax/fine_tuning.py, docs/training.md "Fine-tuning"); not part of the paper's recipe. A
    # checkpoint folder of any run (`runs/x/swa`, `best`, `snapshots/<step>`, `checkpoints`) or a PyTorch state_dict
    # file in the authors' format whose variables start the run at step 0; "" = a random initialisation.
    config.init_from = ""
    # True: only the head (the variables shaped by the tag count) trains; the model runs in evaluation mode, so every
    # BatchNorm keeps the checkpoint's statistics.
    config.freeze_trunk = False
    config.trunk_learning_rate_factor = 1.0  # the trunk's learning rate is this times the schedule's (the head's)

    if variant:
        _apply_variant(config, variant)
    return config


def set_model(
    config: ml_collections.ConfigDict, variant: str | None, name: str, widths: dict[str | None, int], **fields
) -> None:
    """Replaces the CP-ResNet fields by another registered model's (emorf_jax/models/registry.py): its name, its
    `base_channels` for this variant (`widths[None]` is the paper's, "demo" and "test" smaller) and `fields`."""
    config.model = ml_collections.ConfigDict({"name": name, "base_channels": widths[variant or None], **fields})


def use_plain_bce(config: ml_collections.ConfigDict) -> None:
    """The baselines' loss: BCE without a positive weight. The authors' CRNN and ResNet-34 runs and the organisers'
    VGG-ish are calibrated as plain BCE predicts (mean test probability 0.0301, 0.0337 and 0.0252 against a positive
    rate of 0.0319), unlike their FA runs (docs/fidelity.md)."""
    config.loss.pos_weight = 1.0


def use_hop1536(config: ml_collections.ConfigDict) -> None:
    """Trains on the hop-1536 features (CRNN, ResNet-34) for the same SECONDS as every other row: every frame
    count of the config is divided by 3. UNVERIFIED: the paper does not give these rows' crop or window."""
    config.dataset.config_name = "hop1536"
    config.dataset.chunk_frames = round(config.dataset.chunk_frames / 3)  # 0 stays 0: the setting's 20 s
    config.input.crop_frames = round(config.input.crop_frames / 3)
    config.input.max_time_shift = round(config.input.max_time_shift / 3)
    config.input.eval_window_frames = round(config.input.eval_window_frames / 3)


def _apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
    if variant == "demo":
        config.dataset.synthetic_tracks = 320
        config.dataset.chunk_frames = 344  # 4 s: demo tracks (median 6 s) span several chunks, as real ones do
        config.model.base_channels = 16
        config.model.rho = 5
        config.input.crop_frames = 256
        config.input.max_time_shift = 0
        # 2 s, the shortest demo track, as the real 20-s window is shorter than the shortest real track (30 s):
        # only a track shorter than the window gets a window of its own length, and so a compilation of its own.
        config.input.eval_window_frames = 172
        config.batch_size = 16
        config.eval_batch_size = 32
        config.num_epochs = 24
        config.learning_rate = 1e-3  # the small net on synthetic data learns faster with a larger step
        config.lr_constant_epochs = 8
        config.lr_decay_end_epoch = 16
        config.weight_average.start_epoch = 16
        config.weight_average.every_epochs = 1.0
        config.snapshots.start_epoch = 16
        config.snapshots.every_epochs = 2.0
        config.snapshots.ensemble_size = 5
        config.selection_metric = "PR-AUC-macro"
        config.eval_every_epochs = 6.0
        config.checkpoint_every_steps = 50
        config.log_every_steps = 20
        config.bn_reestimate_batches = 8
    elif variant == "dcase":
        # The authors' DCASE 2019 code's values where ours are unverified guesses for MediaEval (docs/fidelity.md):
        # 400 epochs (their experiment scripts' default), the learning rate constant to epoch 50 and decaying to
        # 250, SWA from 250 every 3 epochs, a snapshot after every 5th epoch from 256 on (their trainer saves when
        # the 0-based epoch is > 250 and a multiple of 5), validation every epoch, two-channel input.
        config.num_epochs = _DCASE_EPOCHS
        config.lr_constant_epochs = 50
        config.lr_decay_end_epoch = 250
        config.weight_average.start_epoch = 250
        config.snapshots.start_epoch = 256
        config.eval_every_epochs = 1.0
        config.dataset.config_name = "hop512_stereo"
    elif variant == "test":
        config.dataset.synthetic_tracks = 0
        config.dataset.chunk_frames = 160  # the tests' shards: every track spans several chunks
        config.model.base_channels = 4
        config.model.rho = 2
        config.input.crop_frames = 64
        config.input.max_time_shift = 8
        config.input.eval_window_frames = 128
        config.batch_size = 4
        config.eval_batch_size = 8
        config.num_epochs = 2
        config.lr_constant_epochs = 0.5
        config.lr_decay_end_epoch = 1.5
        config.weight_average.start_epoch = 1
        config.weight_average.every_epochs = 0.5
        config.snapshots.start_epoch = 1
        config.snapshots.every_epochs = 0.5
        config.snapshots.ensemble_size = 2
        config.eval_every_epochs = 1.0
        config.checkpoint_every_steps = 4
        config.log_every_steps = 2
        config.bn_reestimate_batches = 2
    else:
        raise ValueError(f"unknown config variant {variant!r}: use 'demo', 'test', 'dcase' or none")
