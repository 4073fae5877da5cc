"""Tests of mailmeter.metering: the meter, the billing job and the two stores."""
