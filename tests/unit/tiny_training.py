"""The smallest training settings the training tests share (imported by several test files)."""

TINY = dict(
    num_words=0,
    min_count=1,
    embed_dim=16,
    hidden_dim=24,
    attention_dim=16,
    context_dim=16,
    dropout=0.0,
    batch_size=20,
    warmup_steps=2,
    threads=1,
    val_images=4,
    patience=0,
)
