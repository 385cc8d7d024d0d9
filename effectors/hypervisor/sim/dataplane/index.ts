/** The sim live-migration data plane: pre-copy over striped, capped data paths, and the receiving side. */
export {
  DEFAULT_BATCH_BYTES,
  DEFAULT_DOWNTIME_LIMIT_MS,
  DEFAULT_MAX_ROUNDS,
  THROTTLE_MAX,
  THROTTLE_STEP,
  WINDOW_BATCHES,
  preCopy,
  type PreCopyOptions,
  type PreCopyPhase,
  type PreCopyProgress,
  type PreCopyResult,
} from './precopy-sender.ts';
export { type DataPath, type PathReport } from './striper.ts';
export { PageReceiver, pageBatchHandler, type ApplyResult, type PageReceiverOptions, type PageReceiverStats } from './page-receiver.ts';
export { TokenBucket, type TokenBucketOptions } from './token-bucket.ts';
export { batchChecksum, decodeIndexes, encodeIndexes, gatherPages, pageLength } from './page-batch.ts';
