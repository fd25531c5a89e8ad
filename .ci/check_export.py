"""CI check: the newest export classifies real IMDB test reviews, loaded with TensorFlow alone."""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from pipeline.constants import INPUT_NAME, OUTPUT_NAME, SIGNATURE, THRESHOLD

model_dir = Path(sys.argv[1])
version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
serve = tf.saved_model.load(str(model_dir / str(version))).signatures[SIGNATURE]
test = tfds.load("imdb_reviews", split="test[:400]", as_supervised=True, download=False)
texts, labels = zip(*test.as_numpy_iterator(), strict=True)
p = serve(**{INPUT_NAME: tf.constant(list(texts))})[OUTPUT_NAME].numpy()
accuracy = float(np.mean((p >= THRESHOLD) == np.array(labels)))
print(f"export {model_dir}/{version}: accuracy {accuracy:.3f} on 400 real test reviews")
sys.exit(0 if np.all(np.isfinite(p)) and accuracy >= 0.6 else 1)
