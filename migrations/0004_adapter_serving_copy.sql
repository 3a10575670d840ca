-- BLAKE3 over adapter_config.json then `serving.safetensors`, the copy of the weights in the
-- form the engine serves them (f16 where they fit), written beside the upload so a cold load
-- reads and verifies half the bytes of an f32 upload. NULL for rows written before it existed:
-- those load from the uploaded files once, which writes their copy and fills this in.
ALTER TABLE adapters ADD COLUMN serving_blake3 TEXT;
