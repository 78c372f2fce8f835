"""What a device id and a service key may look like (the contract's patterns, shared with drivers)."""

DEVICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
SERVICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,199}$"
