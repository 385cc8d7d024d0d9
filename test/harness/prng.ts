/** The seeded PRNG tests use to replay a randomised run exactly; it lives in core, where fault injection draws from it too. */
export { prng } from '../../core/prng.ts';
