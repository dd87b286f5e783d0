"""Data side: caption files, splits, vocabulary, image loading, augmentation."""
