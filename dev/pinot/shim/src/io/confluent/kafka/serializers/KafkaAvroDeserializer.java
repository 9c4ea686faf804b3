/*
 * Bilten dev shim (not Confluent code): io.confluent:kafka-avro-serializer is not served by the
 * registries our machines reach. Decodes the Confluent wire format (magic byte 0, 4-byte
 * big-endian schema id, Avro binary) with the writer schema fetched from the registry. A payload
 * without the magic byte raises SerializationException("Unknown magic byte!"), which Pinot's
 * KafkaConfluentSchemaRegistryAvroMessageDecoder turns into "discard the row".
 */
package io.confluent.kafka.serializers;

import io.confluent.kafka.schemaregistry.client.SchemaRegistryClient;
import java.nio.ByteBuffer;
import java.util.Map;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Deserializer;

public class KafkaAvroDeserializer implements Deserializer<Object> {
  private static final byte MAGIC_BYTE = 0x0;
  private static final int ID_SIZE = 4;
  private final SchemaRegistryClient _client;

  public KafkaAvroDeserializer(SchemaRegistryClient client) {
    _client = client;
  }

  @Override
  public void configure(Map<String, ?> configs, boolean isKey) {
  }

  @Override
  public Object deserialize(String topic, byte[] payload) {
    if (payload == null) {
      return null;
    }
    if (payload.length < 1 + ID_SIZE || payload[0] != MAGIC_BYTE) {
      throw new SerializationException("Unknown magic byte!");
    }
    int id = ByteBuffer.wrap(payload, 1, ID_SIZE).getInt();
    try {
      Schema schema = _client.getById(id);
      BinaryDecoder decoder = DecoderFactory.get()
          .binaryDecoder(payload, 1 + ID_SIZE, payload.length - 1 - ID_SIZE, null);
      return new GenericDatumReader<Object>(schema).read(null, decoder);
    } catch (java.io.IOException | RuntimeException e) {
      throw new SerializationException("Error deserializing Avro message for id " + id, e);
    }
  }

  @Override
  public void close() {
  }
}
