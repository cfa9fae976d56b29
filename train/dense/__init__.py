"""Dense evaluation: label propagation (DAVIS-2017, JHMDB, VIP) on cached patch features."""
