-- BLAKE3 over adapter_config.json then `serving-int8.safetensors`, the int8 copy of the weights
-- that a server with `adapters.precision = "int8"` serves in place at a cold load (half the
-- bytes of the f16 serving copy, no int8 copy to make on the request path). Written at upload
-- by such a server, or after the first int8 load of a version without one; NULL until then.
ALTER TABLE adapters ADD COLUMN serving_int8_blake3 TEXT;
