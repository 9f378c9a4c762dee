"""Readers that turn raw files (or a generator) into a :class:`aftrec.data.schema.RawLog`."""
