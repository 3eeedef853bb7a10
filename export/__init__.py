"""The checkout's scripts for SavedModels: main.py (cagem-export), sample.py (cagem-sample),
classify.py (cagem-classify); the export itself is cagem_tf.serving's."""
