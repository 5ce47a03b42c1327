"""Small helpers with one home each: durable file writes, tensors and state dicts, images, pretrained loading."""
