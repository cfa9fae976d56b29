"""Stage 1: decode videos, run a frozen image backbone, write features to the store."""
