/** Public surface of the sensors folder: the sensor service, its queues and the built-in sensors. */
export { SensorService } from './sensor-service.ts';
export type { ForwardSink, HeldShipment, InsertHeldOptions, InsertHeldResult, SensorServiceOptions, SensorStats, Subscriber } from './sensor-service.ts';
export { EventQueue } from './event-queue.ts';
export type { QueuedEvent } from './event-queue.ts';
export { HoldQueue } from './hold-queue.ts';
export type { HoldCursor, HoldMark } from './hold-queue.ts';
export { decodeHeld, encodeEvents, encodeHeld } from './journal.ts';
export type { DecodedQueue } from './journal.ts';
export { HostSensor } from './host-sensor.ts';
export type { HostLoadPayload, HostSensorOptions, VmLoad } from './host-sensor.ts';
export { VmSensor } from './vm-sensor.ts';
export type { VmLoadPayload, VmSensorOptions, VmStatePayload } from './vm-sensor.ts';
export type { SensorContext, SensorLogic } from './sensor.ts';
export { UdpRelay, decodePackets, encodePackets, type BufferedPacket, type UdpAddress, type UdpRelayStats } from './udp-relay.ts';
export { VmUdpServices } from './vm-udp-services.ts';
