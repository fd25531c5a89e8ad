"""CI check: the newest export classifies real IMDB test reviews, loaded with TensorFlow alone."""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

model_dir = Path(sys.argv[1])
version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
serve = tf.saved_model.load(str(model_dir / str(version))).signatures["serving_default"]
test = tfds.load("imdb_reviews", split="test[:400]", as_supervised=True, download=False)
texts, labels = zip(*test.as_numpy_iterator())
p = serve(text=tf.constant(list(texts)))["probability"].numpy()
accuracy = float(np.mean((p >= 0.5) == np.array(labels)))
print(f"export {model_dir}/{version}: accuracy {accuracy:.3f} on 400 real test reviews")
sys.exit(0 if np.all(np.isfinite(p)) and accuracy >= 0.6 else 1)
