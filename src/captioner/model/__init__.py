"""The Show-Attend-Tell decoder and the saved-model contract around it."""
