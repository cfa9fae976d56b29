"""freezeframe stage 2: train small temporal modules on cached frozen-backbone features."""
