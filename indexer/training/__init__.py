"""Learning from the stream: pairs mined from posts that name their products, and fine-tuning on them.

``pairs`` writes and reads the dataset (the node mines it while indexing),
``trainer`` fine-tunes the active encoder on it (``lookstream train``) and
writes a model directory that the ``finetuned`` encoder plugin loads by path.
"""
