"""A Hub segmentation dataset (or a local directory ``datasets.load_dataset`` reads) as the source of a run.

The dataset has an image column and a label column of class-index images, as in the transformers
semantic-segmentation examples (``image`` / ``label``, or ``annotation``): :mod:`.columns` finds and checks them.
Its train split is partitioned into labeled and unlabeled rows (``num_labeled`` or ``labeled_fraction``,
``partition_seed``), stratified by each mask's rarest class, and the partition is kept in the run directory as
lists of row ids (``train/000123``) next to ``partition.json``, the options it was drawn with, so a relaunch
reuses it and a relaunch with other options is refused (:mod:`.partition`). Rows of the train split without a
label are always unlabeled. Class names and the palette come from :mod:`.classes`; what the data is, for
``run_config.json``, from :mod:`.identity` (content hashes of the rows).

Everything is loaded and cached by ``datasets`` (:mod:`.loading`); the labeled, unlabeled and val parts are
``datasets.Dataset``\\ s with the package's common features (``id``, ``image``, ``label``). With
``streaming=True`` nothing is downloaded first and the unlabeled part is an
:class:`~stpp_hf.data.streamed.UnlabeledStream`, read lazily and sharded across processes.
"""
