/*
 * Bilten dev shim (not Confluent code): io.confluent:kafka-schema-registry-client is not served
 * by the registries our machines reach. Only the surface Pinot's
 * KafkaConfluentSchemaRegistryAvroMessageDecoder (pinot-confluent-avro 0.11.0) touches exists.
 */
package io.confluent.kafka.schemaregistry.client;

public interface SchemaRegistryClient {
  /** Writer schema registered under a global id (GET /schemas/ids/{id}). */
  org.apache.avro.Schema getById(int id) throws java.io.IOException;
}
