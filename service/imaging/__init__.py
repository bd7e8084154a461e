"""Images: safe decoding, decode pools and processes, batches prepared for the models, the image store."""
