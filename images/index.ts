/**
 * Images from their cheapest holders (issue 14): block index, global indexer, network cost,
 * construction and placement. Wired in by core/agent.ts, the control API and the CLI only.
 */
export { BLOCK_HASH_ALGORITHM, BLOCK_HASH_BYTES, DEFAULT_BLOCK_SIZE, hashBlock, isBlockHash, packHashes, unpackHashes, type BlockHash } from './block-hash.ts';
export { blockCount, blockLength, distinctBlocks, isImageName, manifestId, validateManifest, type ImageManifest } from './image-manifest.ts';
export { scanImage, type ScannedImage } from './image-scan.ts';
export { EMPTY_DELTA, LocalImageIndex, mergeDeltas, type BlockLocation, type ImageInfo, type ImageOrigin, type IndexDelta, type VmDiskInfo } from './local-index.ts';
export { overlayBlocks, parseMap, scanVmDisk, type MapExtent, type ScannedVmDisk, type VmDisk } from './vm-disk-scan.ts';
export { MAX_LINKS, decodeIndexUpdate, decodeManifest, encodeIndexUpdate, encodeManifest, type IndexUpdateBody, type MeasuredLink } from './index-update.ts';
export { GlobalImageIndex, type Holder } from './global-index.ts';
export { DEFAULT_COST, LIBRARY_SOURCE, MIB, costFromMeasurement, costTable, matrixTable, type CostConfig, type CostTable, type LinkMeasurement } from './network-cost.ts';
export { buildImage, type BlockFetcher, type BuildOptions, type BuildProgress, type BuildSummary, type FetchProblem, type LocalBlocks } from './image-builder.ts';
export { buildCosts, parsePolicy, rankCandidates, type Candidate, type PlacementMetric, type PlacementPolicy, type RankedCandidate } from './placement.ts';
export { decodeIndexAnswer, encodeIndexAnswer, type HostLoad, type IndexAnswerBody } from './index-update.ts';
export { ImageService, MAX_BLOCKS_PER_FETCH, imagesDirOf, type BuildJob, type ImageServiceOptions, type ImagesReport, type PlacementReport, type VmImageRef } from './image-service.ts';
export { RANKED_BY_PLACEMENT, rankTargetsByImage, type PlacementSource, type RankedTarget, type TargetLike } from './target-ranking.ts';
export { DEFAULT_MEASURE, LinkMeasurements, MIN_TRANSFER_BYTES, checkProbeReply, groupMeasuredTable, type LinkReport, type MeasureConfig, type Probeable } from './link-probe.ts';
