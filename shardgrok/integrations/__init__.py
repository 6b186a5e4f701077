"""Engine integrations that need more than a layout (DeepSpeed's config entry and ZeRO wrappers)."""
