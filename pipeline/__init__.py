"""Building blocks of mflag. Imports nothing from stages/ or cli.

Each subpackage serves one part of the system; the modules at this level are the small shared core that
every part uses.

Subpackages:
    corpora     pre-training corpora by name (``CORPORA``: mimic, openi, chexpert-plus, pairs) and the
                shard writer prepare uses for all of them
    text        frozen text encoders, embedding reports (embed-text), report files and sections, the demo's MLM
    pretrain    train-vision's building blocks: the training step, named loss terms, schedules, the webdataset
                loader, augmentation, probes, checkpoints and resume state
    vision      the image encoder (ResNet50 trunk, projector, text head) and loading published checkpoints
    downstream  eval: the task registry (``TASKS``), datasets (``downstream.datasets``), splits, heads,
                metrics, recipes, zero-shot and retrieval
    report      the pipeline report: reading stage outputs, claims, statistics, plots
    run         ``cli.py run``'s machinery: the YAML spec and the stage graph
    synth       the synthetic chest X-ray world in the real datasets' formats

Shared core:
    common       errors, atomic writes, JSON, fingerprints, progress, ids from data files
    options      one declaration per config option (checks, names, docs table)
    locks        output-folder locks
    safeload     reading weight files without running code; writing them byte-stable
    distributed  torchrun set-up, device and precision choice
    imaging      reading image files (JPEG/PNG/DICOM) and the one resizer
    tracking     --report-to trackers
    preempt      SIGTERM/SIGINT handling
"""

__version__ = "0.1.0"
