"""Names the exported model and its readers must agree on; no TensorFlow, so anything can import them."""

SIGNATURE = "serving_default"  # the SavedModel signature TF Serving calls by default
INPUT_NAME = "text"  # raw review strings in
OUTPUT_NAME = "probability"  # P(positive) out, float32, one per review
THRESHOLD = 0.5  # probability >= THRESHOLD is "pos", in evaluation, predict and the CI check
