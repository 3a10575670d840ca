-- A job keeps its own copy of the dataset it trains on: deleting the uploaded file must not
-- strand a queued job or a resume after a restart. The hash is the job's data lineage.
ALTER TABLE finetune_jobs ADD COLUMN dataset BLOB;
ALTER TABLE finetune_jobs ADD COLUMN dataset_sha256 TEXT;
ALTER TABLE finetune_jobs ADD COLUMN training_file TEXT;
