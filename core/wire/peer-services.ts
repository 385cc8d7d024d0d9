/**
 * The peer endpoint as an agent service: a feature registers the request types it serves (one
 * contract, PeerFrameService) and gets them from every authenticated peer link, without passing
 * through the mobility service, whose handler table and frame guard are for migrations only.
 * Mobility is the first protocol on the link; images (block fetch, index updates) the second.
 */
import { EmbotError, ErrorCodes } from '../errors.ts';
import type { RequestType } from './frames.ts';
import type { RequestHandler } from './peer-connection.ts';
import type { PeerServer } from './peer-server.ts';

/** Request types feature services serve. A type here has the rule `service` in mobility's frame guard. */
export const SERVICE_REQUEST_TYPES = ['BlockFetch', 'IndexUpdate', 'IndexQuery', 'ImageBuild', 'PeerStatus'] as const satisfies readonly RequestType[];
export type ServiceRequestType = (typeof SERVICE_REQUEST_TYPES)[number];

/** What a feature registers: its name (for errors and logs) and a handler per request type it serves. */
export interface PeerFrameService {
  readonly name: string;
  readonly handlers: { readonly [K in ServiceRequestType]?: RequestHandler<K> };
}

/** The agent's peer endpoint, as the service registry hands it out (`peer`). */
export interface PeerEndpoint {
  /** This agent's name on the peer links. */
  readonly agent: string;
  /**
   * Serves the service's request types on every authenticated link, current and future; returns
   * the undo.
   *
   * @throws EmbotError `EMBOT_ERR_SERVICE_EXISTS` when another service already serves one of them.
   */
  register(service: PeerFrameService): () => void;
}

/** The endpoint over a listening PeerServer. */
export function peerEndpoint(server: PeerServer): PeerEndpoint {
  const owners = new Map<ServiceRequestType, string>();
  return {
    agent: server.agent,
    register(service) {
      const types = Object.keys(service.handlers).filter((t) => service.handlers[t as ServiceRequestType] !== undefined) as ServiceRequestType[];
      for (const t of types) {
        if (!(SERVICE_REQUEST_TYPES as readonly string[]).includes(t)) throw new EmbotError(ErrorCodes.SERVICE_EXISTS, `${service.name}: ${t} is not a service request type`);
        const owner = owners.get(t);
        if (owner !== undefined) throw new EmbotError(ErrorCodes.SERVICE_EXISTS, `${service.name}: ${t} is already served by ${owner}`);
      }
      const undo = types.map((t) => {
        owners.set(t, service.name);
        const off = server.handle(t, service.handlers[t] as RequestHandler<typeof t>);
        return () => {
          off();
          owners.delete(t);
        };
      });
      return () => undo.forEach((u) => u());
    },
  };
}
