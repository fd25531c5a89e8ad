"""Names the exported model and its readers must agree on; no TensorFlow, so anything can import them."""

SIGNATURE = "serving_default"  # the SavedModel signature TF Serving calls by default
INPUT_NAME = "text"  # raw review strings in
OUTPUT_NAME = "probability"  # P(positive) out, float32, one per review
LABEL_NAME = "label"  # the predicted class's name out, string: LABELS[1] at THRESHOLD and above
LABELS = ("neg", "pos")  # names of label 0 and 1 unless the data names them (tfds imdb_reviews' own)
THRESHOLD = 0.5  # probability >= THRESHOLD is "pos", in evaluation, predict and the CI check
